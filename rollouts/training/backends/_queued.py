"""The part every backend shares: protocol calls queued on one worker thread, and the bookkeeping
of gradients accumulated between optimizer steps.

A backend subclasses `QueuedBackend` and writes the bodies (`_forward_backward`, `_forward`,
`_optim_step`, `_save_checkpoint`, `_load_checkpoint`, `_get_weights`, `_export_hf`); the public
methods here queue them in submission order and return their futures.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rollouts.core.futures import TrainFuture
from rollouts.core.worker import SerialWorker
from rollouts.training.backends.protocol import NORMALIZATIONS
from rollouts.training.losses import Batch, label_logprobs

__all__ = [
    "QueuedBackend",
    "check_step_options",
    "require_save_pretrained",
    "sampler_comparison",
    "thread_setup",
]


def check_step_options(normalization: str, max_grad_norm: float | None) -> None:
    """The constructor checks every backend makes of its loss normalisation and clipping."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}; must be one of {NORMALIZATIONS}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")


def thread_setup(num_threads: int | None, device: torch.device) -> Callable[[], None] | None:
    """What the worker thread does first: its intra-op thread count, its current CUDA device.

    Both are per thread in torch, so they are set on the worker itself, never on the caller.
    """
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be None (torch's default) or >= 1, got {num_threads}")
    if num_threads is None and device.type != "cuda":
        return None

    def setup() -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)

    return setup


class QueuedBackend(ABC):
    """Protocol methods over a `SerialWorker`; subclasses set the attributes below."""

    _worker: SerialWorker
    _step: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None

    # -- the protocol: each call queues its body on the worker ------------------------------------

    def forward_backward(self, batch: Batch) -> TrainFuture[dict[str, Any]]:
        return self._worker.submit("forward_backward", lambda: self._forward_backward(batch))

    def forward(self, batch: Batch) -> TrainFuture[dict[str, Any]]:
        return self._worker.submit("forward", lambda: self._forward(batch))

    def optim_step(self) -> TrainFuture[dict[str, Any]]:
        return self._worker.submit("optim_step", self._optim_step)

    def save_checkpoint(self, step: int) -> TrainFuture[Path]:
        return self._worker.submit("save_checkpoint", lambda: self._save_checkpoint(step))

    def load_checkpoint(self, path: str | Path) -> TrainFuture[dict[str, Any]]:
        return self._worker.submit("load_checkpoint", lambda: self._load_checkpoint(Path(path)))

    def get_weights(self) -> TrainFuture[dict[str, torch.Tensor]]:
        return self._worker.submit("get_weights", self._get_weights)

    def export_hf(self, path: str | Path) -> TrainFuture[Path]:
        return self._worker.submit("export_hf", lambda: self._export_hf(Path(path)))

    def close(self) -> None:
        self._worker.close()

    def __enter__(self) -> QueuedBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def step(self) -> int:
        """Optimizer steps taken (read it from a result to be in order with the stream)."""
        return self._step

    # -- bodies, written by each backend; run on the worker thread --------------------------------

    @abstractmethod
    def _forward_backward(self, batch: Batch) -> dict[str, Any]: ...

    @abstractmethod
    def _forward(self, batch: Batch) -> dict[str, Any]: ...

    @abstractmethod
    def _optim_step(self) -> dict[str, Any]: ...

    @abstractmethod
    def _save_checkpoint(self, step: int) -> Path: ...

    @abstractmethod
    def _load_checkpoint(self, path: Path) -> dict[str, Any]: ...

    @abstractmethod
    def _get_weights(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def _export_hf(self, path: Path) -> Path: ...

    # -- gradient accumulation between optimizer steps ---------------------------------------------

    def _reset_accumulation(self) -> None:
        self._accum_weight = 0.0  # the token weight (or its relative form) since the last step
        self._accum_tokens = 0
        self._accum_calls = 0

    def _normalisation_scale(self, normalization: str, where: str) -> float:
        """1 / accumulated weight for "token_mean", 1 for "sum"; raises if nothing to step on."""
        if self._accum_calls == 0:
            raise RuntimeError("optim_step with no forward_backward since the last step")
        if normalization == "sum":
            return 1.0
        if self._accum_weight <= 0:
            raise ValueError(
                f"optim_step: the {self._accum_calls} forward_backward call(s) since the last "
                f"step carried no weighted token{where} (every label -100 or loss_mask 0)"
            )
        return 1.0 / self._accum_weight

    def _apply_step(
        self, grad_norm: float, step_optimizer: Callable[[], Any], refuse_non_finite: bool = True
    ) -> dict[str, Any]:
        """The end of every `optim_step`, once gradients are normalised and clipped: refuse a
        non-finite norm (weights untouched), step the optimizer and scheduler, zero the grads.

        `step_optimizer` returning False means it skipped the update (a gradient scaler saw an
        overflow): the schedule and the step count then stay, and the result says `skipped`."""
        if refuse_non_finite and not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"optim_step {self._step + 1}: gradient norm is {grad_norm}; the update was not "
                "applied and the weights are those of the last good step"
            )
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses
        skipped = step_optimizer() is False
        if not skipped:
            if self.scheduler is not None:
                self.scheduler.step()
            self._step += 1
        self.optimizer.zero_grad(set_to_none=True)
        result = {"step": self._step, "lr": lr, "grad_norm": grad_norm, "skipped": skipped}
        result["num_tokens"] = self._accum_tokens
        self._reset_accumulation()
        return result

    def _assert_no_pending_gradients(self, call: str) -> None:
        if self._accum_calls:
            raise RuntimeError(
                f"{call}: {self._accum_calls} forward_backward call(s) have gradients not yet "
                "applied; call optim_step first so the checkpoint resumes exactly"
            )


def require_save_pretrained(model: torch.nn.Module) -> Callable[..., Any]:
    """The model's `save_pretrained`, or a TypeError saying export_hf needs a Hugging Face model."""
    save_pretrained = getattr(model, "save_pretrained", None)
    if save_pretrained is None:
        raise TypeError(
            f"{type(model).__name__} has no save_pretrained; export_hf needs a Hugging Face model"
        )
    return save_pretrained


def sampler_comparison(logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
    """For an RL batch (one with `sampling_logprobs`): `{"logprobs": [B, T]}`, the trainer's
    log-probs of the labels before the update, so a loop can compare trainer and sampler on the
    same tokens without a second forward. `{}` for any other batch (it costs a log-softmax)."""
    if batch.get("sampling_logprobs") is None:
        return {}
    return {"logprobs": label_logprobs(logits.detach(), batch["labels"]).cpu()}
