"""The table of experiments. Adding one means writing its module and adding its class here."""

from __future__ import annotations

from .core import Experiment
from .experiments.feature_learning import FeatureLearning
from .experiments.finetune import Finetune
from .experiments.init_scale import InitScale
from .experiments.lora_gd_rate import LoraGDRate
from .experiments.lora_mf import LoraMF
from .experiments.matrix_sensing import MatrixSensing
from .experiments.pinn import PINN_EXPERIMENTS
from .experiments.sensitivity import Sensitivity
from .experiments.step_rules import StepRules
from .experiments.strongly_convex import StronglyConvex
from .experiments.trajectory_fidelity import TrajectoryFidelity

__all__ = ["EXPERIMENTS", "get_experiment"]

EXPERIMENTS: dict[str, type[Experiment]] = {
    cls.name: cls
    for cls in (StronglyConvex, MatrixSensing, TrajectoryFidelity, FeatureLearning, LoraMF, LoraGDRate, *PINN_EXPERIMENTS, InitScale, Sensitivity, StepRules,
                Finetune)
}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]()
    except KeyError:
        raise SystemExit(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}") from None
