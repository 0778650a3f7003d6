"""Errors raised by the merge engine. Every one names the file and the problem."""
from __future__ import annotations

from typing import Iterable, List

from ..io import safetensors


class MergeError(ValueError):
    """A merge cannot run (bad input, bad option, refused output). Nothing was written."""


class HeaderError(MergeError, safetensors.HeaderError):
    """A checkpoint file's header is malformed or inconsistent with the file (the
    :class:`fastsoup.io.safetensors.HeaderError` the reader raised, as a MergeError)."""


class PlanError(MergeError):
    """Inputs do not match. ``problems`` lists every mismatch found (all at once)."""

    MAX_LINES = 200

    def __init__(self, summary: str, problems: Iterable[str]):
        self.problems: List[str] = list(problems)
        lines = self.problems[: self.MAX_LINES]
        more = len(self.problems) - len(lines)
        text = f"{summary} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"
        text += "".join(f"\n  - {p}" for p in lines)
        if more:
            text += f"\n  ... and {more} more (see the report's 'problems' list)"
        super().__init__(text)
