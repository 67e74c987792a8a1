"""A doctor's finding: one check, its status, what it measured and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field

STATUSES = ("ok", "info", "warn", "fail")  # in rising severity
MARKS = {"ok": "OK  ", "info": "INFO", "warn": "WARN", "fail": "FAIL"}


@dataclass
class Check:
    """name: short id (``on_policy``, ``reference``, ...); status: one of ``STATUSES``; message: one line of
    what was measured; fix: one line of what to do (empty when nothing); data: the numbers, JSON-able."""

    name: str
    status: str
    message: str
    fix: str = ""
    data: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def line(self) -> str:
        text = f"[{MARKS[self.status]}] {self.name}: {self.message}"
        return text + (f" -> fix: {self.fix}" if self.fix else "")

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "message": self.message, "fix": self.fix,
                "data": self.data}


def worst(checks) -> str:
    """The overall verdict: the most severe status among ``checks``, information counting as ok ("ok" when empty)."""
    status = max((c.status for c in checks), key=STATUSES.index, default="ok")
    return "ok" if status == "info" else status
