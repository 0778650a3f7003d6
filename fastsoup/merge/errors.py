"""Errors raised by the merge engine, and the diagnostics they carry.

Every error names the file and the problem. Problems and warnings are grouped by cause
(:class:`Diagnostic`): a checkpoint has hundreds or thousands of tensors, so one cause
(an input missing a component, a dtype that differs, weights that cancel) gives one line
with a count, a few example keys and the likely fix, while the full list stays available
(``problems`` / ``--json``). :func:`flag` names an option the way the user sets it
(``--overwrite`` from ``fastsoup-merge``, ``overwrite=True`` from Python).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from ..io import safetensors


class MergeError(ValueError):
    """A merge cannot run (bad input, bad option, refused output). Nothing was written."""


class HeaderError(MergeError, safetensors.HeaderError):
    """A checkpoint file's header is malformed or inconsistent with the file (the
    :class:`fastsoup.io.safetensors.HeaderError` the reader raised, as a MergeError)."""


# ------------------------------------------------------------------ option names
_FROM_CLI = contextvars.ContextVar("fastsoup_merge_from_cli", default=False)


@contextlib.contextmanager
def cli_option_names():
    """Within this block, :func:`flag` spells options as command-line flags."""
    token = _FROM_CLI.set(True)
    try:
        yield
    finally:
        _FROM_CLI.reset(token)


def from_cli() -> bool:
    """Whether the current merge was started by ``fastsoup-merge``."""
    return _FROM_CLI.get()


def flag(name: str, value: object = True) -> str:
    """How the user sets option ``name`` to ``value``: ``--overwrite`` / ``--no-normalize`` /
    ``--dtype bf16`` from the command line, ``overwrite=True`` / ``normalize=False`` /
    ``dtype='bf16'`` from Python."""
    if not _FROM_CLI.get():
        return f"{name}={value!r}"
    opt = name.replace("_", "-")
    if value is True:
        return f"--{opt}"
    if value is False:
        return f"--no-{opt}"
    return f"--{opt} {value}"


# ------------------------------------------------------------------ diagnostics
@dataclass
class Diagnostic:
    """One cause and every tensor it affects.

    ``message`` says what is wrong without naming tensors ("missing from input 2
    (/m/b)"); ``keys`` lists every affected tensor (may be empty for a cause that concerns
    no tensor); ``fix`` is the likely remedy; ``details`` holds one full line per tensor
    (what ``--json`` prints)."""

    cause: str
    message: str
    keys: List[str] = field(default_factory=list)
    fix: Optional[str] = None
    details: List[str] = field(default_factory=list)

    EXAMPLES = 3

    def line(self) -> str:
        """One line: the message, the count and a few example keys, then the fix."""
        text = self.message
        n = len(self.keys)
        if n == 1 and len(self.details) == 1:  # one tensor: its own full line
            text = self.details[0]
        elif n:
            shown = ", ".join(repr(k) for k in self.keys[: self.EXAMPLES])
            more = ", ..." if n > self.EXAMPLES else ""
            text += f" [{n} tensor{'s' if n != 1 else ''}: {shown}{more}]"
        if self.fix:
            text += f"; {self.fix}"
        return text

    def to_dict(self) -> dict:
        return {"cause": self.cause, "message": self.message, "count": len(self.keys),
                "keys": list(self.keys), "fix": self.fix,
                "details": list(self.details) or [self.message]}


class Diagnostics:
    """Collects :class:`Diagnostic` s, grouping by ``(cause, message)`` in first-seen
    order."""

    def __init__(self) -> None:
        self._groups: Dict[Tuple[str, str], Diagnostic] = {}

    def add(self, cause: str, message: str, key: Optional[str] = None,
            detail: Optional[str] = None, fix: Optional[str] = None) -> Diagnostic:
        d = self._groups.get((cause, message))
        if d is None:
            d = self._groups[(cause, message)] = Diagnostic(cause, message, fix=fix)
        if key is not None:
            d.keys.append(key)
        if detail is not None:
            d.details.append(detail)
        elif key is not None:
            d.details.append(f"{key!r}: {message}")
        if fix and not d.fix:
            d.fix = fix
        return d

    def extend(self, other: Iterable[Diagnostic]) -> None:
        for d in other:
            self._groups[(d.cause, d.message)] = d

    def __iter__(self):
        return iter(self._groups.values())

    def __len__(self) -> int:
        return len(self._groups)

    def __bool__(self) -> bool:
        return bool(self._groups)

    def lines(self) -> List[str]:
        return [d.line() for d in self]

    def details(self) -> List[str]:
        return [x for d in self for x in (d.details or [d.message])]


class PlanError(MergeError):
    """Inputs do not match. The message has one line per cause (:class:`Diagnostic`);
    ``problems`` lists every problem found (one per tensor), ``diagnostics`` the causes."""

    MAX_LINES = 200

    def __init__(self, summary: str, problems: Iterable, diagnostics: Optional[Iterable[Diagnostic]] = None):
        if diagnostics is None:
            diagnostics = [p if isinstance(p, Diagnostic) else Diagnostic("problem", str(p))
                           for p in problems]
        self.diagnostics: List[Diagnostic] = list(diagnostics)
        self.problems: List[str] = [x for d in self.diagnostics
                                    for x in (d.details or [d.message])]
        lines = [d.line() for d in self.diagnostics]
        shown = lines[: self.MAX_LINES]
        count = len(self.problems)
        text = f"{summary} ({count} problem{'s' if count != 1 else ''}"
        if len(lines) != count:
            text += f", {len(lines)} cause{'s' if len(lines) != 1 else ''}"
        text += "):" + "".join(f"\n  - {line}" for line in shown)
        if len(lines) > len(shown):
            text += f"\n  ... and {len(lines) - len(shown)} more (see the report's 'problems' list)"
        super().__init__(text)


def some(items, limit: int) -> str:
    """The first ``limit`` items joined by "; ", with how many more there are."""
    items = list(items)
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more
