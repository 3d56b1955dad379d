"""Every experiment module registers itself on import."""

from . import matrix_sensing, strongly_convex, trajectory_fidelity  # noqa: F401
