"""argparse pieces shared by the ``odelora`` commands: one-line errors and checked value types."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["OneLineParser", "positive_int", "nonnegative_int", "positive_float", "folder_problem", "out_dir"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (what was wrong, where to look) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, check, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and v != float("inf"), "a positive number")


def folder_problem(text: str) -> str | None:
    """What keeps ``text`` from being a folder that can be made (a file there or above it), or None."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        return f"{text} is a file, not a folder"
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{text}: {parent} is a file, not a folder"
    return None


def out_dir(text: str) -> str:
    """An output folder that is not a file and whose nearest existing ancestor is a folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name; leave --out out for the default folder")
    problem = folder_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text
