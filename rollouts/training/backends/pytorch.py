"""`PyTorchTrainingBackend`: the `TrainingBackend` protocol on one device (CPU, CUDA or MPS).

All work runs on one worker thread in submission order (see `rollouts.core.worker`), so every
torch op of the backend happens on the same thread and uses one OpenMP team; the caller's thread
(an event loop, say) only queues calls and is woken when they finish.

How a step is computed (normalisation "token_mean"):
    forward_backward(micro_batch_i):  backward of  mean_i * W_i     (W_i = the micro-batch's token
                                                                     weight, so this is its sum)
    optim_step():                      grads /= sum_i W_i ; clip ; optimizer.step ; scheduler.step
which equals one backward of the mean over all tokens of the step, however the tokens are split.
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from rollouts.core.worker import QUEUE_DEPTH_MAX_DEFAULT, SerialWorker
from rollouts.training.backends._queued import (
    QueuedBackend,
    check_step_options,
    require_save_pretrained,
    sampler_comparison,
    thread_setup,
)
from rollouts.training.backends.checkpointing import (
    atomic_directory,
    capture_rng_state,
    checkpoint_path,
    restore_rng_state,
)
from rollouts.training.losses import Batch, LossFn, label_logprobs, token_weights

__all__ = ["PyTorchTrainingBackend", "validate_device"]

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


class PyTorchTrainingBackend(QueuedBackend):
    """A model, its optimizer, loss and optional scheduler on one device, behind ordered futures.

    `max_grad_norm=None` disables clipping (the norm is still reported). `autocast_dtype`
    (bfloat16 or float16) runs the forward under `torch.autocast`; float16 adds a gradient scaler.
    Without it, the model computes in its own dtype. `num_threads` sets the worker thread's
    intra-op thread count (None: torch's default), e.g. 1 to leave a core to a rollout engine.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        checkpoint_dir: str | Path,
        device: str | torch.device,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_grad_norm: float | None = 1.0,
        *,
        normalization: str = "token_mean",
        autocast_dtype: torch.dtype | None = None,
        queue_depth_max: int = QUEUE_DEPTH_MAX_DEFAULT,
        num_threads: int | None = None,
    ) -> None:
        check_step_options(normalization, max_grad_norm)
        if autocast_dtype is not None and autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype={autocast_dtype}; must be None or {AUTOCAST_DTYPES}")
        self.device = validate_device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.scheduler = scheduler
        self.checkpoint_dir = Path(checkpoint_dir)
        self.max_grad_norm = max_grad_norm
        self.normalization = normalization
        self.autocast_dtype = autocast_dtype
        use_scaler = autocast_dtype == torch.float16 and self.device.type == "cuda"
        self._scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._step = 0
        self._reset_accumulation()
        self._worker = SerialWorker(
            "PyTorchTrainingBackend", queue_depth_max, thread_setup(num_threads, self.device)
        )

    # -- bodies, run on the worker thread ---------------------------------------------------------

    def _forward_backward(self, batch: Batch) -> dict[str, Any]:
        batch = _to_device(batch, self.device)
        weights_BT = token_weights(batch)
        token_weight = weights_BT.sum()
        self.model.train()
        with torch.enable_grad():
            with self._autocast():
                logits = _logits_of(self.model, batch)
            loss = self.loss_fn(logits, batch)
            _check_loss_scalar(loss)
            relative_weight = self._relative_weight(token_weight.item())
            summed = loss * relative_weight  # the call's weighted sum over the reference weight
            (self._scaler.scale(summed) if self._scaler else summed).backward()
        self._accum_weight += relative_weight
        num_tokens = int((weights_BT != 0).sum().item())
        self._accum_tokens += num_tokens
        self._accum_calls += 1
        result = {
            "loss": loss.item(),
            "num_tokens": num_tokens,
            "token_weight": float(token_weight),
        }
        return result | sampler_comparison(logits, batch)

    @torch.no_grad()
    def _forward(self, batch: Batch) -> dict[str, Any]:
        batch = _to_device(batch, self.device)
        weights_BT = token_weights(batch)
        self.model.eval()
        with self._autocast():
            logits = _logits_of(self.model, batch)
        loss = self.loss_fn(logits, batch)
        _check_loss_scalar(loss)
        return {
            "loss": loss.item(),
            "num_tokens": int((weights_BT != 0).sum().item()),
            "token_weight": weights_BT.sum().item(),
            "logprobs": label_logprobs(logits, batch["labels"]).cpu(),
        }

    def _optim_step(self) -> dict[str, Any]:
        scale = self._normalisation_scale(self.normalization, "")
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        grad_norm = _scale_and_clip(self._params, scale, self.max_grad_norm)
        if self._scaler is None:
            return self._apply_step(grad_norm, self.optimizer.step)
        scaler = self._scaler

        def scaled_step() -> bool:
            scale_before = scaler.get_scale()
            scaler.step(self.optimizer)  # skips the update itself when the grads overflowed
            scaler.update()  # and then lowers the scale
            return scaler.get_scale() >= scale_before

        # With a scaler an overflow is expected now and then: it skips the step, no error.
        return self._apply_step(grad_norm, scaled_step, refuse_non_finite=False)

    def _save_checkpoint(self, step: int) -> Path:
        self._assert_no_pending_gradients("save_checkpoint")
        final_path = checkpoint_path(self.checkpoint_dir, step)
        with atomic_directory(final_path) as tmp_path:
            safetensors.torch.save_model(self.model, str(tmp_path / "model.safetensors"))
            torch.save(self._trainer_state(), tmp_path / "trainer_state.pt")
            meta = {"step": step, "optimizer_step": self._step, "backend": "pytorch"}
            (tmp_path / "meta.json").write_text(json.dumps(meta, indent=2))
        return final_path

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self._scaler.state_dict() if self._scaler else None,
            "optimizer_step": self._step,
            "rng": capture_rng_state(),
        }

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        model_file, state_file = path / "model.safetensors", path / "trainer_state.pt"
        for required in (model_file, state_file):
            if not required.is_file():
                raise FileNotFoundError(f"not a checkpoint directory: {path} (missing {required})")
        missing, unexpected = safetensors.torch.load_model(
            self.model, str(model_file), device=str(self.device)
        )
        if missing or unexpected:
            raise ValueError(f"{model_file} does not match the model: {missing=} {unexpected=}")
        # Our own file, holding NumPy RNG state, hence weights_only=False: load trusted paths only.
        # On CPU: the RNG states must stay CPU tensors; the optimizer moves its own state to the
        # parameters' device in load_state_dict.
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        _check_same_presence("scheduler", state["scheduler"], self.scheduler, state_file)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        _check_same_presence("gradient scaler", state["scaler"], self._scaler, state_file)
        if self._scaler is not None:
            self._scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.optimizer.zero_grad(set_to_none=True)
        self._step = int(state["optimizer_step"])
        self._reset_accumulation()
        return {"step": self._step}

    def _get_weights(self) -> dict[str, torch.Tensor]:
        return {
            name: tensor.detach().to("cpu", copy=True)
            for name, tensor in self.model.state_dict().items()
        }

    def _export_hf(self, path: Path) -> Path:
        save_pretrained = require_save_pretrained(self.model)
        with atomic_directory(path) as tmp_path:
            save_pretrained(tmp_path)
        return path

    def _reset_accumulation(self) -> None:
        super()._reset_accumulation()
        self._reference_weight: float | None = None

    def _relative_weight(self, token_weight: float) -> float:
        """A call's token weight divided by the step's first non-zero one ("sum": not divided).

        Dividing by the first weight rather than backpropagating raw sums keeps the common case of
        one forward_backward per step bit-identical to a plain `mean.backward()` (the factor is
        exactly 1.0), while accumulation over micro-batches stays exact.
        """
        if self.normalization == "sum":
            return token_weight
        if self._reference_weight is None and token_weight > 0:
            self._reference_weight = token_weight
        return token_weight / self._reference_weight if self._reference_weight else 0.0

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


# -- pure pieces, shared with the sharded backend -------------------------------------------------


def validate_device(device: str | torch.device) -> torch.device:
    """Parse `device` and check that this machine has it; raise ValueError naming it otherwise."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"invalid device {device!r}: {error}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(parsed)!r} was asked for, but CUDA is not available in this torch "
                f"build ({torch.__version__}) or machine; use 'cpu'"
            )
        index = 0 if parsed.index is None else parsed.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(parsed)!r}: only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(parsed)!r}: MPS is not available on this machine; use 'cpu'")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(parsed)!r}: must be 'cpu', 'cuda[:N]' or 'mps'")
    return parsed


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    if "labels" not in batch or "input_ids" not in batch:
        raise KeyError(f"a batch needs 'input_ids' and 'labels'; got keys {sorted(batch)}")
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def _logits_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Run the model on the batch's inputs; accept a logits tensor or an output with .logits."""
    inputs = {key: batch[key] for key in MODEL_INPUT_KEYS if key in batch}
    if hasattr(getattr(model, "config", None), "use_cache"):
        # A Hugging Face model otherwise fills a KV cache on every forward that nothing reads
        # (and with a cache, packed rows are not kept from attending to each other).
        inputs["use_cache"] = False
    output = model(**inputs)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{type(model).__name__} returned {type(output).__name__}; expected a logits tensor "
            "or an object with a .logits tensor"
        )
    return logits


def _check_same_presence(name: str, saved: object, live: object, path: Path) -> None:
    """A checkpoint and the backend loading it agree on having a scheduler (or a scaler)."""
    if (saved is None) != (live is None):
        has = "holds" if saved is not None else "holds no"
        wants = "has none" if live is None else "has one"
        raise ValueError(f"{path} {has} {name} state but this backend {wants}")


def _check_loss_scalar(loss: torch.Tensor) -> None:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn must return a scalar tensor (the weighted mean), got {shape}")


def _scale_and_clip(params: list[nn.Parameter], scale: float, max_grad_norm: float | None) -> float:
    """Multiply every gradient by `scale`, clip to `max_grad_norm`; return the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise RuntimeError("optim_step: no parameter has a gradient")
    if scale != 1.0:
        torch._foreach_mul_(grads, scale)
    max_norm = math.inf if max_grad_norm is None else max_grad_norm
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
