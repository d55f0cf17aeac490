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
                         also "logprobs": Tensor [B, T], the trainer's before the update}
    forward          -> {"loss": float, "num_tokens": int, "token_weight": float,
                         "logprobs": Tensor [B, T] float32 on CPU (0 where ignored)}
    optim_step       -> {"step": int (steps taken so far), "lr": float (the rate this step used),
                         "grad_norm": float (global, before clipping), "num_tokens": int,
                         "skipped": bool (True only when a float16 gradient scaler found an
                         overflow and skipped the update; the schedule then waits too)}
    save_checkpoint  -> Path of the finished checkpoint directory
    load_checkpoint  -> {"step": int}
    get_weights      -> {name: Tensor}, a CPU copy of the model's state dict
    export_hf        -> Path of a Hugging Face `save_pretrained` directory
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from rollouts.core.futures import TrainFuture
from rollouts.training.losses import Batch

__all__ = ["NORMALIZATIONS", "TrainingBackend"]

NORMALIZATIONS = ("token_mean", "sum")


@runtime_checkable
class TrainingBackend(Protocol):
    """A model, its optimizer and loss behind an ordered stream of asynchronous calls."""

    def forward_backward(self, batch: Batch) -> TrainFuture[dict[str, Any]]:
        """Forward, loss, backward; gradients accumulate until `optim_step`."""
        ...

    def forward(self, batch: Batch) -> TrainFuture[dict[str, Any]]:
        """Forward and loss without gradients; also returns per-token label log-probs."""
        ...

    def optim_step(self) -> TrainFuture[dict[str, Any]]:
        """Normalise, clip, step the optimizer and scheduler, zero the gradients."""
        ...

    def save_checkpoint(self, step: int) -> TrainFuture[Path]:
        """Write model, optimizer, scheduler, step and RNG state atomically; return the dir."""
        ...

    def load_checkpoint(self, path: str | Path) -> TrainFuture[dict[str, Any]]:
        """Restore everything `save_checkpoint` wrote."""
        ...

    def get_weights(self) -> TrainFuture[dict[str, torch.Tensor]]:
        """A CPU copy (never a view) of the current weights, for a rollout engine."""
        ...

    def export_hf(self, path: str | Path) -> TrainFuture[Path]:
        """Write the full model as a Hugging Face `save_pretrained` directory."""
        ...

    def close(self) -> None:
        """Finish queued work and stop the worker; later calls raise."""
        ...
