"""Experiment interface, registry, and the claim record a report is made of."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from pydantic import BaseModel, ConfigDict

__all__ = ["ExperimentConfig", "Experiment", "Claim", "EXPERIMENTS", "register", "get_experiment"]


class ExperimentConfig(BaseModel):
    """Base of every experiment config: typed, validated, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    seeds: int = 3


@dataclass
class Claim:
    """One checked statement: what the theory predicts, what was measured, PASS or FAIL."""

    claim: str
    prediction: str
    measured: str
    passed: bool | None  # None: reported only, no pass criterion
    source: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "REPORTED" if self.passed is None else ("PASS" if self.passed else "FAIL")

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


class Experiment:
    """An experiment is a grid of independent cases, each producing rows, plus a report.

    Subclasses set ``name``, ``Config`` (with ``quick()`` giving the reduced preset) and implement
    ``cases``, ``run_case`` and ``report``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[ExperimentConfig]]

    def quick_config(self) -> ExperimentConfig:
        return self.Config(**getattr(self, "QUICK", {}))

    def prepare(self, cfg) -> None:
        """Work shared by all cases (e.g. filling a cache), run once before the grid."""

    def cases(self, cfg) -> list[dict]:
        raise NotImplementedError

    def run_case(self, cfg, case: dict) -> list[dict]:
        raise NotImplementedError

    def report(self, df: pd.DataFrame, cfg, out: Path) -> tuple[list[Claim], list[str]]:
        """Claims and the figure file names (relative to ``out``) drawn from ``df``."""
        raise NotImplementedError


EXPERIMENTS: dict[str, Experiment] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    EXPERIMENTS[cls.name] = cls()
    return cls


def get_experiment(name: str) -> Experiment:
    from . import experiments  # noqa: F401  (fills the registry)

    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise SystemExit(f"unknown experiment {name!r}; choose one of: {', '.join(sorted(EXPERIMENTS))}") from None
