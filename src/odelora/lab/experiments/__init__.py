"""Every experiment module registers itself on import."""

from . import feature_learning, lora_gd_rate, lora_mf, matrix_sensing, strongly_convex, trajectory_fidelity  # noqa: F401
