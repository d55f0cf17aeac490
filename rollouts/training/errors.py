"""The errors a training backend raises, by what they mean for the stream of calls.

Refused (raised at submission, or on the worker before the call changed anything; the call after
it runs as usual):
    InvalidBatchError       a batch fails the cheap checks (keys, shapes, dtypes, value ranges)
    PendingGradientsError   save_checkpoint with gradients accumulated and not yet applied
    NoWeightedTokensError   optim_step whose forward_backward calls carried no weighted token
                            (those calls are discarded: they contributed nothing)
    NonFiniteGradientError  optim_step whose gradient norm is NaN or inf: the update is not
                            applied and the step's gradients are discarded
    CorruptCheckpointError  load_checkpoint of a checkpoint whose files fail their checksums
    CheckpointFailedError   a sharded save, load or export that failed on some rank, agreed on
                            by every rank

Stream-stopping (the call may have left state half-changed): any other exception from inside
backward, the optimizer step or a checkpoint load. It is raised with a note naming the suspect
state; later calls raise `BackendFailedError` until `discard_gradients()` (gradients suspect) or
`load_checkpoint(path)` (weights suspect) succeeds. See `docs/architecture.md`.
"""

from __future__ import annotations

from rollouts.core.worker import BackendFailedError, BackendQueueFullError

__all__ = [
    "BackendFailedError",
    "BackendQueueFullError",
    "CallRefusedError",
    "CheckpointFailedError",
    "CorruptCheckpointError",
    "InvalidBatchError",
    "NoWeightedTokensError",
    "NonFiniteGradientError",
    "PendingGradientsError",
]


class CallRefusedError(Exception):
    """A call refused before it changed any state; the backend takes the next call."""


class InvalidBatchError(CallRefusedError, ValueError):
    """A batch failed the backend's checks; raised by the submitting call, nothing queued."""


class PendingGradientsError(CallRefusedError, RuntimeError):
    """A checkpoint was asked for while gradients wait for `optim_step`."""


class NoWeightedTokensError(CallRefusedError, ValueError):
    """`optim_step` found no weighted token in the calls since the last step."""


class NonFiniteGradientError(CallRefusedError, FloatingPointError):
    """`optim_step` found a NaN or infinite gradient norm and did not update the weights."""


class CorruptCheckpointError(CallRefusedError, ValueError):
    """A checkpoint's files do not match their recorded checksums (or some are missing); it was
    not loaded and the backend is as it was."""


class CheckpointFailedError(CallRefusedError, RuntimeError):
    """A sharded save, load or export failed on some rank; every rank raises it alike and the
    training state is unchanged."""
