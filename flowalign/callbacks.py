"""Callbacks: code that observes the one training loop instead of wrapping it (demo, bench, user code).

A callback subclasses :class:`TrainerCallback` and overrides the events it needs; ``Trainer(cfg, callbacks=[...])``
or ``trainer.add_callback(cb)`` registers it. Events, in order, each with the trainer as first argument:

- ``on_train_begin(trainer)``: ``Trainer.train`` starts (after any resume);
- ``on_step_begin(trainer)``: an iteration starts;
- ``on_phase_begin(trainer, phase)`` / ``on_phase_end(trainer, phase)``: around each part of an iteration,
  phase one of ``PHASES`` ("rollout", "reward" = scoring and advantages, "update"), and around every held-out
  evaluation ("eval");
- ``on_step_end(trainer, metrics) -> bool``: after each iteration (metrics already logged); return True to stop
  training after this iteration (the periodic evaluation and checkpoint of that iteration still happen);
- ``on_evaluate(trainer, row)``: after each held-out evaluation (``Trainer.evaluate``'s row);
- ``on_train_end(trainer, summary)``: ``run_training`` has written everything (summary: its return value).

Callbacks must not change the trainer's state: a run with and without them takes the same steps.
"""

from __future__ import annotations

from typing import Optional

PHASES = ("rollout", "reward", "update", "eval")


class TrainerCallback:
    """No-op base: override the events you need."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_step_begin(self, trainer) -> None:
        pass

    def on_phase_begin(self, trainer, phase: str) -> None:
        pass

    def on_phase_end(self, trainer, phase: str) -> None:
        pass

    def on_step_end(self, trainer, metrics: dict) -> Optional[bool]:
        return None

    def on_evaluate(self, trainer, row: dict) -> None:
        pass

    def on_train_end(self, trainer, summary: dict) -> None:
        pass


class CallbackList:
    """Calls an event on every callback in order; ``on_step_end`` is True when any callback asked to stop."""

    def __init__(self, callbacks=()):
        self.callbacks: list[TrainerCallback] = list(callbacks)

    def add(self, callback: TrainerCallback) -> None:
        if not isinstance(callback, TrainerCallback):
            raise TypeError(f"a callback must subclass flowalign.callbacks.TrainerCallback, got "
                            f"{type(callback).__name__}")
        self.callbacks.append(callback)

    def __getattr__(self, event: str):
        if not event.startswith("on_"):
            raise AttributeError(event)

        def call(*args):
            results = [getattr(cb, event)(*args) for cb in self.callbacks]
            return any(bool(r) for r in results)

        return call

