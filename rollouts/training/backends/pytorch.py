"""`PyTorchTrainingBackend`: the `TrainingBackend` protocol on one device (CPU, CUDA or MPS).

All work runs on one worker thread in submission order (see `rollouts.core.worker`), so every
torch op of the backend happens on the same thread and uses one OpenMP team; the caller's thread
(an event loop, say) only queues calls and is woken when they finish. The step itself (batch
checks, accumulation, normalisation, refusals) is shared with the sharded backend in
`_queued.py`; this file holds what is particular to one device: autocast and the float16
gradient scaler, plain clipping, and single-file checkpoints.
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

from rollouts.core.weights import WeightUpdate
from rollouts.core.worker import CLOSE_TIMEOUT_S_DEFAULT, QUEUE_DEPTH_MAX_DEFAULT
from rollouts.training.backends._queued import QueuedBackend, write_hf_directory
from rollouts.training.backends.checkpointing import (
    TRAINED_ONLY,
    atomic_directory,
    capture_rng_state,
    restore_rng_state,
    step_of,
    verify_checksums,
    write_checksums,
)
from rollouts.training.backends.lora import adapter_update, is_lora_model
from rollouts.training.lm_head import HEAD_CHUNK_AUTO
from rollouts.training.losses import LossFn

__all__ = ["PyTorchTrainingBackend", "validate_device"]

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


class PyTorchTrainingBackend(QueuedBackend):
    """A model, its optimizer, loss and optional scheduler on one device, behind ordered futures.

    `max_grad_norm=None` disables clipping (the norm is still reported). `autocast_dtype`
    (bfloat16 or float16) runs the forward under `torch.autocast`; float16 adds a gradient scaler.
    Without it, the model computes in its own dtype. `num_threads` sets the worker thread's
    intra-op thread count (None: torch's default; "auto": the count that runs fastest when the
    worker starts, see `rollouts.core.threads`), e.g. 1 to leave a core to a rollout engine.
    `queue_depth_max` bounds the calls pending at once; `close_timeout_s` how long `close()` and
    interpreter exit wait for them. `tokenizer`, when given, is written by `export_hf` beside the
    weights (the factories pass the model directory's own). `head_chunk_logits` runs the LM head
    and a token-local loss only at weighted positions, that many logits at a time ("auto": 2^26
    from a 4,096-token vocabulary up; None: the model's full logits, bit-identical to a plain
    loop; see `rollouts.training.lm_head`).
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
        num_threads: int | str | None = None,
        close_timeout_s: float = CLOSE_TIMEOUT_S_DEFAULT,
        tokenizer: Any | None = None,
        head_chunk_logits: int | str | None = HEAD_CHUNK_AUTO,
    ) -> None:
        if autocast_dtype is not None and autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype={autocast_dtype}; must be None or {AUTOCAST_DTYPES}")
        parsed_device = validate_device(device)
        super().__init__(
            name="PyTorchTrainingBackend",
            model=model.to(parsed_device),
            optimizer=optimizer,
            loss_fn=loss_fn,
            checkpoint_dir=checkpoint_dir,
            device=parsed_device,
            scheduler=scheduler,
            max_grad_norm=max_grad_norm,
            normalization=normalization,
            queue_depth_max=queue_depth_max,
            num_threads=num_threads,
            close_timeout_s=close_timeout_s,
            tokenizer=tokenizer,
            head_chunk_logits=head_chunk_logits,
        )
        self.autocast_dtype = autocast_dtype
        use_scaler = autocast_dtype == torch.float16 and parsed_device.type == "cuda"
        self._scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    # -- the pieces of the shared bodies -----------------------------------------------------------

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _backward(self, loss: torch.Tensor) -> None:
        (self._scaler.scale(loss) if self._scaler is not None else loss).backward()

    def _call_stats(self, loss: torch.Tensor, weights_BT: torch.Tensor) -> dict[str, Any]:
        return {
            "loss": loss.item(),
            "num_tokens": int((weights_BT != 0).sum().item()),
            "token_weight": weights_BT.sum().item(),
        }

    def _clip_gradients(self, scale: float) -> float:
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        return _scale_and_clip(self._params, scale, self.max_grad_norm)

    def _layer_grad_norms(self, scale: float) -> dict[str, float]:
        # With a float16 scaler the gradients still carry the loss scale here (clipping
        # unscales them): take it out of the figures too.
        loss_scale = self._scaler.get_scale() if self._scaler is not None else 1.0
        return super()._layer_grad_norms(scale / loss_scale)

    def _refuses_non_finite(self) -> bool:
        # With a scaler an overflow is expected now and then: it skips the step, no error.
        return self._scaler is None

    def _step_optimizer(self) -> bool | None:
        if self._scaler is None:
            return self.optimizer.step()
        scale_before = self._scaler.get_scale()
        self._scaler.step(self.optimizer)  # skips the update itself when the grads overflowed
        self._scaler.update()  # and then lowers the scale
        return self._scaler.get_scale() >= scale_before

    # -- checkpoints and weights -------------------------------------------------------------------

    def _write_checkpoint(self, final_path: Path) -> None:
        trained = self._trained_subset()
        with atomic_directory(final_path) as tmp_path:
            if trained is None:
                safetensors.torch.save_model(self.model, str(tmp_path / "model.safetensors"))
            else:  # frozen weights (a LoRA base) come from the model directory, not from here
                on_cpu = {name: t.to("cpu").contiguous() for name, t in trained.items()}
                safetensors.torch.save_file(on_cpu, str(tmp_path / "model.safetensors"))
            torch.save(self._trainer_state(), tmp_path / "trainer_state.pt")
            meta = {
                "step": step_of(final_path),
                "optimizer_step": self._step,
                "backend": "pytorch",
                "weights": "all" if trained is None else TRAINED_ONLY,
            }
            (tmp_path / "meta.json").write_text(json.dumps(meta, indent=2))
            write_checksums(tmp_path)

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
        verify_checksums(path)  # a damaged file is refused here, before any weight changes
        # Our own file, holding NumPy RNG state, hence weights_only=False: load trusted paths only.
        # On CPU: the RNG states must stay CPU tensors; the optimizer moves its own state to the
        # parameters' device in load_state_dict.
        saved = self._read_trained_weights(path, model_file)  # None: a whole-model file
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        _check_same_presence("scheduler", state["scheduler"], self.scheduler, state_file)
        _check_same_presence("gradient scaler", state["scaler"], self._scaler, state_file)
        self._touch("weights")  # from here a failure leaves a half-loaded model
        if saved is not None:
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    if name in saved:
                        param.copy_(saved[name])
        else:
            missing, unexpected = safetensors.torch.load_model(
                self.model, str(model_file), device=str(self.device), strict=False
            )
            if missing or unexpected:
                raise ValueError(f"{model_file} does not match the model: {missing=} {unexpected=}")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self._scaler is not None:
            self._scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self._discard_gradients()
        self._step = int(state["optimizer_step"])
        return {"step": self._step}

    def _read_trained_weights(self, path: Path, model_file: Path) -> dict[str, torch.Tensor] | None:
        """A LoRA checkpoint's trained weights, checked against this backend's; None for a
        whole-model checkpoint. Either kind refused, naming it, by a backend of the other."""
        trained_only = _saved_weights(path) == TRAINED_ONLY
        trained = self._trained_subset()
        if trained_only != (trained is not None):
            holds = "only the trained (adapter) weights" if trained_only else "the whole model"
            trains = "the whole model" if trained is None else "only some weights (LoRA)"
            raise ValueError(
                f"{path} holds {holds}, but this backend trains {trains}; load it into a backend "
                "built the same way (same base model, same lora_rank and targets)"
            )
        if trained is None:
            return None
        saved = safetensors.torch.load_file(str(model_file), device="cpu")
        if set(saved) != set(trained) or any(saved[n].shape != trained[n].shape for n in trained):
            raise ValueError(
                f"{model_file} holds other trained weights than this backend's (LoRA rank or "
                f"targets differ?): e.g. {sorted(set(saved) ^ set(trained))[:3]}"
            )
        return saved

    def _trained_subset(self) -> dict[str, torch.Tensor] | None:
        """The trained parameters by name when some are frozen (LoRA), else None (all train)."""
        if not self._trains_subset:
            return None
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def _get_weights(self) -> dict[str, torch.Tensor]:
        return {
            name: tensor.detach().to("cpu", copy=True)
            for name, tensor in self.model.state_dict().items()
        }

    def _sampler_weights(self) -> WeightUpdate:
        if is_lora_model(self.model):  # the engine keeps its base weights; only adapters travel
            return adapter_update(self.model)
        return WeightUpdate(tensors=self._get_weights())

    def _export_hf(self, path: Path, adapter_only: bool) -> Path:
        return write_hf_directory(path, self.model, self.tokenizer, adapter_only=adapter_only)


# -- pure pieces -----------------------------------------------------------------------------------


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


def _saved_weights(path: Path) -> str:
    """What a checkpoint's model file holds: "all", or TRAINED_ONLY (older ones: "all")."""
    meta_file = path / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return str(meta.get("weights", "all"))


def _check_same_presence(name: str, saved: object, live: object, path: Path) -> None:
    """A checkpoint and the backend loading it agree on having a scheduler (or a scaler)."""
    if (saved is None) != (live is None):
        has = "holds" if saved is not None else "holds no"
        wants = "has none" if live is None else "has one"
        raise ValueError(f"{path} {has} {name} state but this backend {wants}")


def _scale_and_clip(params: list[nn.Parameter], scale: float, max_grad_norm: float | None) -> float:
    """Multiply every gradient by `scale`, clip to `max_grad_norm`; return the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise RuntimeError("optim_step: no parameter has a gradient")
    if scale != 1.0:
        torch._foreach_mul_(grads, scale)
    max_norm = math.inf if max_grad_norm is None else max_grad_norm
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
