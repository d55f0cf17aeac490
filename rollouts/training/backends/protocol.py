"""`TrainingBackend`: the protocol every backend fulfils, single-device or sharded.

Every method returns at once with a `TrainFuture`; the work runs on the backend's worker in
submission order, so a caller may queue several calls before awaiting any of them.

Batch format (a dict of tensors, on any device; the backend moves them):
    input_ids    [B, T] int64
    labels       [B, T] int64, aligned with the logits: labels[b, t] is the target of logits[b, t];
                 -100 marks a position that carries no loss
    loss_mask    [B, T] optional per-token weights (0 = ignored)
    attention_mask, position_ids   optional, passed to the model when present
    anything else (advantages, sampling_logprobs, ...) is passed untouched to `loss_fn`

Loss normalisation ("token_mean", the default): the loss of one optimizer step is the weighted
mean over every token of every `forward_backward` since the last step, so splitting a batch into
micro-batches (or across ranks) never changes the update. "sum" leaves the weighted sum
unnormalised.

Results (plain Python values; tensors only where named):
    forward_backward -> {"loss": float (this call's weighted mean), "num_tokens": int,
                         "token_weight": float; for an RL batch (one with sampling_logprobs)
                         also "logprobs": Tensor [B, T], the trainer's before the update, at
                         least at its weighted positions (elsewhere 0 or the label's; every
                         labelled position with return_logprobs=True)}
    forward          -> {"loss": float, "num_tokens": int, "token_weight": float,
                         "logprobs": Tensor [B, T] float32 on CPU (0 where ignored)}
    optim_step       -> {"step": int (steps taken so far), "lr": float (the rate this step used),
                         "grad_norm": float (global, before clipping), "num_tokens": int,
                         "skipped": bool (True only when a float16 gradient scaler found an
                         overflow and skipped the update; the schedule then waits too)}
    save_checkpoint  -> Path of the finished checkpoint directory
    load_checkpoint  -> {"step": int}
    get_weights      -> {name: Tensor}, a CPU copy of the model's state dict
    export_hf        -> Path of a complete Hugging Face directory: weights, config, generation
                        config, and the backend's tokenizer with its chat template when it has one
                        (LoRA: merged, or with adapter_only=True the PEFT adapter alone)
    sampler_weights  -> WeightUpdate: what this rank's rollout engine needs (see core.weights)
    discard_gradients -> {"discarded_calls": int}

Errors (`rollouts.training.errors`, and `docs/architecture.md` for the whole model): a malformed
batch raises `InvalidBatchError` from `forward_backward` / `forward` themselves, nothing queued. A
call refused on the worker before it changed anything (a save with pending gradients, a step with
no weighted token, a non-finite gradient norm) fails only its own future. An exception that may
have left state half-changed (inside backward, the optimizer step, a load) stops the stream until
`discard_gradients()` or `load_checkpoint(path)` repairs it.

What orchestrators may rely on besides the calls: `data_parallel` (this rank's place among the
ranks that share each batch), `device`, `num_parameters`, `queue_depth_max` (never have more calls
pending), and the backend's own checkpoints (`list_checkpoints`, `find_checkpoint`,
`delete_checkpoint`): an orchestrator never builds a checkpoint path itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from rollouts.core.futures import TrainFuture
from rollouts.core.weights import WeightUpdate
from rollouts.training.losses import Batch, LossFn

__all__ = ["NORMALIZATIONS", "AdamSettings", "Checkpoint", "DataParallel", "TrainingBackend"]

NORMALIZATIONS = ("token_mean", "sum")


@dataclass(frozen=True, kw_only=True)
class DataParallel:
    """This process's place among the ranks that train on slices of every batch (0 of 1 alone).

    Every rank submits the same calls in the same order; rank `rank` feeds its slice of each
    global batch. Results are global, so only the main rank needs to log or write shared files.
    """

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"DataParallel needs 0 <= rank < size, got {self.rank} of {self.size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Checkpoint:
    """A finished checkpoint of a backend: the optimizer step it was saved at and where it is.

    Orchestrators may keep their own small files inside `path` (written after the backend's
    save returned it); everything else in it belongs to the backend.
    """

    step: int
    path: Path


@dataclass(frozen=True, kw_only=True)
class AdamSettings:
    """One `optim_step`'s AdamW settings (decoupled weight decay), replacing the backend's own for
    that step only: a caller that sends them with every step (the Tinker API) sets them all."""

    learning_rate: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # clip the gradient norm to this; None: no clipping

    def __post_init__(self) -> None:
        numbers = {"learning_rate": self.learning_rate, "eps": self.eps,
                   "weight_decay": self.weight_decay}  # fmt: skip
        for name, value in numbers.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"AdamSettings.{name}={value!r}; must be a finite number >= 0")
        if not (self.learning_rate > 0 and self.eps > 0):
            raise ValueError(
                f"AdamSettings learning_rate={self.learning_rate}, eps={self.eps}; both must be > 0"
            )
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"AdamSettings.betas={self.betas!r}; must be two numbers in [0, 1)")
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            raise ValueError(
                f"AdamSettings.max_grad_norm={self.max_grad_norm!r}; must be > 0, or None (off)"
            )


def check_step_overrides(learning_rate: float | None, adam: AdamSettings | None) -> None:
    """What every backend's `optim_step` checks of its per-step overrides, before queueing."""
    if learning_rate is not None and (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, int | float)
        or not math.isfinite(learning_rate)
        or learning_rate <= 0
    ):
        raise ValueError(f"optim_step(learning_rate={learning_rate!r}); must be a number > 0")
    if adam is not None and not isinstance(adam, AdamSettings):
        raise TypeError(f"optim_step(adam=...) takes an AdamSettings, got {type(adam)}")
    if adam is not None and learning_rate is not None:
        raise ValueError("optim_step: pass learning_rate or adam (which has its own), not both")


@runtime_checkable
class TrainingBackend(Protocol):
    """A model, its optimizer and loss behind an ordered stream of asynchronous calls."""

    queue_depth_max: int  # calls that may be pending at once; one more raises BackendQueueFullError

    @property
    def data_parallel(self) -> DataParallel: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def num_parameters(self) -> int:
        """Parameters of the whole model (all ranks' shards together), for FLOP estimates."""
        ...

    def forward_backward(
        self, batch: Batch, *, loss_fn: LossFn | None = None, return_logprobs: bool = False
    ) -> TrainFuture[dict[str, Any]]:
        """Forward, loss, backward; gradients accumulate until `optim_step`. `loss_fn` replaces
        the backend's loss for this call; `return_logprobs` adds the per-token label log-probs
        (an RL batch, with `sampling_logprobs`, always has them)."""
        ...

    def forward(
        self, batch: Batch, *, loss_fn: LossFn | None = None
    ) -> TrainFuture[dict[str, Any]]:
        """Forward and loss without gradients; also returns per-token label log-probs."""
        ...

    def optim_step(
        self,
        *,
        learning_rate: float | None = None,
        layer_grad_norms: bool = False,
        adam: AdamSettings | None = None,
    ) -> TrainFuture[dict[str, Any]]:
        """Normalise, clip, step the optimizer and scheduler, zero the gradients. `learning_rate`
        replaces the scheduled rate for this step only (a learning-rate sweep, say); `adam`
        replaces rate, betas, eps, weight decay and clipping for this step only;
        `layer_grad_norms` adds {"layer_grad_norms": {layer: norm before clipping}}."""
        ...

    def discard_gradients(self) -> TrainFuture[dict[str, Any]]:
        """Drop the gradients accumulated since the last step (also repairs suspect gradients)."""
        ...

    def save_checkpoint(self, step: int) -> TrainFuture[Path]:
        """Write model, optimizer, scheduler, step and RNG state atomically; return the dir."""
        ...

    def load_checkpoint(self, path: str | Path) -> TrainFuture[dict[str, Any]]:
        """Restore everything `save_checkpoint` wrote (also repairs a failed stream)."""
        ...

    def list_checkpoints(self) -> list[Checkpoint]:
        """Finished checkpoints, oldest step first (a save still queued is not listed yet)."""
        ...

    def find_checkpoint(self, step: int) -> Checkpoint | None:
        """The finished checkpoint of `step`, or None."""
        ...

    def delete_checkpoint(self, step: int) -> None:
        """Remove the checkpoint of `step` (no-op if there is none); call it on one rank."""
        ...

    def get_weights(self) -> TrainFuture[dict[str, torch.Tensor]]:
        """A CPU copy (never a view) of the current weights; on a sharded backend, rank 0's
        result holds them and the others' is empty."""
        ...

    def sampler_weights(self) -> TrainFuture[WeightUpdate]:
        """What this rank's rollout engine needs to sample from the current weights (a snapshot,
        never a view): every rank gets its own."""
        ...

    def export_hf(self, path: str | Path, *, adapter_only: bool = False) -> TrainFuture[Path]:
        """Write the full model as a Hugging Face `save_pretrained` directory (a LoRA model
        merged); `adapter_only=True` writes a LoRA backend's adapter as a PEFT directory."""
        ...

    def close(self) -> None:
        """Finish queued work (bounded; see `rollouts.core.worker`) and stop; later calls raise."""
        ...
