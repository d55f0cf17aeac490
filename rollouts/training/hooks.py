"""Loop hooks: plain objects the SFT and RL loops call with what they already computed.

    class StopAboveLoss:
        def on_step(self, record):            # after each optimizer step
            return "loss diverged" if record["loss"] > 10 else None

    await run_sft_training(backend, data, config, hooks=[StopAboveLoss()])

A hook has any of `on_step(record)`, `on_eval(record)` and `on_checkpoint(record)`; each receives
a copy of the record the loop logs (step, loss, lr, ...; an evaluation's figures; a checkpoint's
step, path and reasons) and returns None to go on, or a string: the reason to stop. The run then
stops after the step in flight, saves its final checkpoint as it would at the end, and reports
`stop_reason = "hook: <reason>"`. A hook that raises ends the run with that exception, like any
error of the loop. Hooks run on the loop's own thread, between calls; keep them quick.

With a sharded backend every rank calls its hooks, and a stop must be asked for on every rank
alike: decide from the global figures (loss, lr, grad_norm, val_loss, the step), never from
timings or memory, which differ per rank. RL evaluations run on rank 0 only, so a sharded RL run
stops from step records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["HOOK_EVENTS", "HookRunner"]

HOOK_EVENTS = ("step", "eval", "checkpoint")


class HookRunner:
    """The hooks of one run, and the first stop any of them asked for."""

    def __init__(self, hooks: Sequence[Any] = ()) -> None:
        for hook in hooks:
            if not any(callable(getattr(hook, f"on_{event}", None)) for event in HOOK_EVENTS):
                raise TypeError(
                    f"hook {hook!r} has none of on_step, on_eval, on_checkpoint; a hook "
                    "implements at least one of them (see rollouts.training.hooks)"
                )
        self.hooks = list(hooks)
        self.stop_reason: str | None = None

    def call(self, event: str, record: dict[str, Any]) -> None:
        """Call every hook's `on_<event>` with a copy of `record`; keep the first stop reason."""
        assert event in HOOK_EVENTS, f"unknown hook event {event!r}"
        for hook in self.hooks:
            method = getattr(hook, f"on_{event}", None)
            if method is None:
                continue
            reason = method(dict(record))
            if reason is not None and self.stop_reason is None:
                self.stop_reason = str(reason)

    @property
    def stop_requested(self) -> bool:
        return self.stop_reason is not None

    def result_reason(self) -> str:
        """The run's `stop_reason` once a hook stopped it."""
        assert self.stop_reason is not None, "only after a stop was asked for"
        return f"hook: {self.stop_reason}"
