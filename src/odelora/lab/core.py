"""What an experiment is: a typed config, a grid of cases, and the claims a report is made of.

Nothing here knows any particular experiment; the table of experiments is ``registry.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
import typing
from typing import Annotated, ClassVar, Literal

import pandas as pd
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveInt, field_validator

from .argtypes import folder_problem

__all__ = ["ExperimentConfig", "Experiment", "Claim", "NonEmpty", "Folder", "fmt", "VERDICTS"]


def _distinct(values: list) -> list:
    twice = [v for i, v in enumerate(values) if v in values[:i]]
    if twice:
        raise ValueError(f"{twice[0]!r} is listed twice: list each value once")
    return values


def _folder(text: str) -> str:
    problem = folder_problem(text)
    if problem:
        raise ValueError(problem + ": name a folder")
    return text


Folder = Annotated[str, Field(min_length=1), AfterValidator(_folder)]  # a folder the lab writes in (cache, checkpoints)


def NonEmpty(item):  # noqa: N802  (a type constructor)
    """``list[item]`` of distinct values, at least one (the values a sweep runs)."""
    return Annotated[list[item], Field(min_length=1), AfterValidator(_distinct)]


class ExperimentConfig(BaseModel):
    """Base of every experiment config: typed, validated, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)
    seeds: PositiveInt = Field(3, description="number of random seeds (0, 1, ...)")


VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE", "FINDING", "REPORTED")


@dataclass
class Claim:
    """One statement with what predicts it, what was measured, and a verdict.

    ``passed`` is True/False for a claim with a pass criterion, None for a measurement reported
    without one. A *finding* (``finding=True``) is a statement from the sources examined against
    the measurements: it is reported, with ``note`` saying what it would take to hold.
    ``inconclusive=True`` marks a claim with a pass criterion that the measurements cannot decide
    (nothing was tested, or the verdict would rest on a bound); ``note`` says why.
    ``note`` explains a FAIL, an inconclusive claim or a finding in words built from the measured numbers.
    """

    claim: str
    prediction: str
    measured: str
    passed: bool | None
    source: str = ""
    note: str = ""
    finding: bool = False
    inconclusive: bool = False
    table: str = ""  # an optional markdown table with the measured values in full

    @property
    def verdict(self) -> str:
        if self.finding:
            return "FINDING"
        if self.inconclusive:
            return "INCONCLUSIVE"
        return "REPORTED" if self.passed is None else ("PASS" if self.passed else "FAIL")

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def merged_with(field: str, defaults: dict):
    """A config validator: a dict given for ``field`` is merged into ``defaults`` (keys not given
    keep their default)."""
    return field_validator(field, mode="before")(classmethod(lambda cls, v: {**defaults, **v} if isinstance(v, dict) else v))


def fmt(x: float, spec: str = ".3g", nonfinite: str = "not finite") -> str:
    """A number for report text; NaN/inf are replaced by words saying why (never 'nan'/'inf')."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return nonfinite
    return format(x, spec) if math.isfinite(x) else nonfinite


Suite = Literal["matrix", "pinn", "real"]
SUITES: tuple[Suite, ...] = typing.get_args(Suite)


class Experiment:
    """A grid of independent cases, each producing rows, plus a report drawn from the rows.

    Subclasses set ``name``, ``summary``, ``Config`` and ``QUICK`` (the reduced preset) and
    implement ``cases``, ``run_case``, ``report`` and ``describe``. ``case_cost`` is the expected
    seconds of one case on one core of the reference machine (used for the time estimate).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[ExperimentConfig]]
    QUICK: ClassVar[dict] = {}
    out: Path | None = None  # the output folder, set by the runner before ``prepare`` (e.g. for caches)
    # Which part of the lab it belongs to: "matrix" (the theory on matrix problems, minutes), "pinn"
    # (PINN fine-tuning grids) or "real" (pretrained networks). `odelora reproduce` picks suites.
    SUITE: ClassVar[Suite] = "matrix"
    # Config keys that only say which cases exist (each case's parameters say how it runs): a
    # folder whose config differs from a new one in these keys alone keeps its saved cases, so a
    # sweep grows (more seeds, rates, methods) by running only the new cases.
    SWEEP_KEYS: ClassVar[frozenset[str]] = frozenset()

    def quick_config(self) -> ExperimentConfig:
        return self.Config(**self.QUICK)

    def prepare(self, cfg) -> None:
        """Work shared by all cases (e.g. filling a cache), run once before the grid."""

    def prepare_cost(self, cfg) -> float:
        return 0.0

    def cases(self, cfg) -> list[dict]:
        raise NotImplementedError

    def case_cost(self, cfg, case: dict) -> float:
        return 1.0

    def run_case(self, cfg, case: dict) -> list[dict]:
        raise NotImplementedError

    def report(self, df: pd.DataFrame, cfg, out: Path) -> tuple[list[Claim], list[str]]:
        """Claims and the figure file names (relative to ``out``) drawn from ``df``."""
        raise NotImplementedError

    def describe(self, df: pd.DataFrame, cfg) -> str:
        """One sentence: what this run measured (built from the config and the rows)."""
        return f"{df['case'].nunique()} cases, {len(df)} rows."
