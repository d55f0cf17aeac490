"""What every backend shares, written once: protocol calls queued on one worker thread, batch
checks at submission, the training step's bodies, gradient accumulation, and the checkpoint
listing.

A backend subclasses `QueuedBackend` and supplies what differs between one device and many:
the model call (`_logits`), how a call's figures combine over ranks (`_call_stats`), clipping
(`_clip_gradients`), the optimizer step (`_step_optimizer`), and the checkpoint and weight bodies
(`_write_checkpoint`, `_load_checkpoint`, `_get_weights`, `_sampler_weights`, `_export_hf`).

How a step is computed (normalisation "token_mean"), with W_i the token weight of call i (over
all ranks) and R the step's reference weight:
    forward_backward(micro_batch_i):  backward of  mean_i * W_i / R
    optim_step():                     grads /= sum_i W_i / R ; clip ; optimizer.step ; schedule
which is the gradient of the weighted mean over every token of the step, however the tokens are
split over calls and ranks. On one device R is the first non-zero W_i, so a step of one call
backpropagates `mean * 1.0`, bit-identical to a plain loop; across ranks R = 1 (each rank's
slice sum, added up by the sharded reduction). "sum" leaves the weighted sum unnormalised.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rollouts.core.futures import TrainFuture
from rollouts.core.threads import AUTO_THREADS, pick_cpu_threads
from rollouts.core.weights import WeightUpdate
from rollouts.core.worker import CLOSE_TIMEOUT_S_DEFAULT, QUEUE_DEPTH_MAX_DEFAULT, SerialWorker
from rollouts.training.backends.checkpointing import (
    atomic_directory,
    checkpoint_path,
    delete_directory,
    list_checkpoints,
    step_of,
)
from rollouts.training.backends.lora import is_lora_model, merged_state_dict, unties_the_head
from rollouts.training.backends.protocol import (
    NORMALIZATIONS,
    AdamSettings,
    Checkpoint,
    DataParallel,
    check_step_overrides,
)
from rollouts.training.batch_checks import check_batch_layout, check_batch_values, on_cpu
from rollouts.training.errors import (
    NonFiniteGradientError,
    NoWeightedTokensError,
    PendingGradientsError,
)
from rollouts.training.lm_head import (
    HEAD_CHUNK_AUTO,
    HeadLoss,
    head_chunk_tokens,
    head_loss,
    hidden_states_as_logits,
    plain_head_owner,
)
from rollouts.training.losses import (
    IGNORE_INDEX,
    Batch,
    LossFn,
    apply_temperature,
    is_token_local,
    label_logprobs,
    token_weights,
)

__all__ = [
    "QueuedBackend",
    "layer_of",
    "require_save_pretrained",
    "thread_setup",
    "write_hf_directory",
]

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
GRADIENTS, WEIGHTS = "gradients", "weights"  # the states a failed call may leave suspect
RECOVERY_HINTS = {
    GRADIENTS: "call discard_gradients() (or load_checkpoint(path)); the weights are intact",
    WEIGHTS: "call load_checkpoint(path) to restore weights and optimizer from a checkpoint",
}


class QueuedBackend(ABC):
    """Protocol methods over a `SerialWorker`; see the module docstring."""

    def __init__(
        self,
        *,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        checkpoint_dir: str | Path,
        device: torch.device,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        max_grad_norm: float | None,
        normalization: str,
        queue_depth_max: int = QUEUE_DEPTH_MAX_DEFAULT,
        num_threads: int | str | None = None,
        close_timeout_s: float = CLOSE_TIMEOUT_S_DEFAULT,
        data_parallel: DataParallel | None = None,
        recovery_hints: dict[str, str] | None = None,
        tokenizer: Any | None = None,
        head_chunk_logits: int | str | None = HEAD_CHUNK_AUTO,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={normalization!r}; must be one of {NORMALIZATIONS}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.scheduler = scheduler
        self.tokenizer = tokenizer  # written by export_hf beside the weights, when given
        self.checkpoint_dir = Path(checkpoint_dir)
        self.max_grad_norm, self.normalization = max_grad_norm, normalization
        self._device = device
        self._data_parallel = data_parallel or DataParallel()
        self._params = [p for p in model.parameters() if p.requires_grad]
        # Some weights frozen (a LoRA base): checkpoints then hold the trained ones only.
        self._trains_subset = len(self._params) < sum(1 for _ in model.parameters())
        self._num_parameters = sum(p.numel() for p in model.parameters())  # global for DTensors
        self._vocab_in, self._vocab_out = _vocab_sizes(model)
        self._head_owner = plain_head_owner(model)
        self._head_chunk_tokens = head_chunk_tokens(head_chunk_logits, self._vocab_out)
        self._step = 0
        self._reset_accumulation()
        self._recovery_hints = recovery_hints or RECOVERY_HINTS
        self._worker = SerialWorker(
            name,
            queue_depth_max,
            thread_setup(num_threads, device),
            close_timeout_s=close_timeout_s,
            recovery_hints=self._recovery_hints,
        )
        self.queue_depth_max = queue_depth_max

    # -- what orchestrators read -------------------------------------------------------------------

    @property
    def data_parallel(self) -> DataParallel:
        return self._data_parallel

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_parameters(self) -> int:
        return self._num_parameters

    @property
    def step(self) -> int:
        """Optimizer steps taken (read it from a result to be in order with the stream)."""
        return self._step

    # -- the protocol: each call queues its body on the worker -------------------------------------

    def forward_backward(
        self, batch: Batch, *, loss_fn: LossFn | None = None, return_logprobs: bool = False
    ) -> TrainFuture[dict[str, Any]]:
        values_checked = self._check_batch(batch, "forward_backward")
        loss = self._loss_for_call(loss_fn, "forward_backward")
        return self._worker.submit(
            "forward_backward",
            lambda: self._forward_backward(batch, values_checked, loss, return_logprobs),
        )

    def forward(
        self, batch: Batch, *, loss_fn: LossFn | None = None
    ) -> TrainFuture[dict[str, Any]]:
        values_checked = self._check_batch(batch, "forward")
        loss = self._loss_for_call(loss_fn, "forward")
        return self._worker.submit("forward", lambda: self._forward(batch, values_checked, loss))

    def optim_step(
        self,
        *,
        learning_rate: float | None = None,
        layer_grad_norms: bool = False,
        adam: AdamSettings | None = None,
    ) -> TrainFuture[dict[str, Any]]:
        check_step_overrides(learning_rate, adam)
        if adam is not None and "betas" not in self.optimizer.param_groups[0]:
            raise ValueError(
                f"optim_step(adam=...): the optimizer is a {type(self.optimizer).__name__}, "
                "which has no Adam settings to replace"
            )
        return self._worker.submit(
            "optim_step", lambda: self._optim_step(learning_rate, layer_grad_norms, adam)
        )

    def discard_gradients(self) -> TrainFuture[dict[str, Any]]:
        return self._worker.submit(
            "discard_gradients", self._discard_gradients, recovers=(GRADIENTS,)
        )

    def clear_optimizer_state(self) -> TrainFuture[dict[str, Any]]:
        """Forget the optimizer's per-parameter state (Adam's moments), keeping the weights and
        the step count: what loading weights without the optimizer means (not in the protocol)."""
        return self._worker.submit("clear_optimizer_state", self._clear_optimizer_state)

    def save_checkpoint(self, step: int) -> TrainFuture[Path]:
        final_path = checkpoint_path(self.checkpoint_dir, step)  # a bad step raises here
        return self._worker.submit("save_checkpoint", lambda: self._save_checkpoint(final_path))

    def load_checkpoint(self, path: str | Path) -> TrainFuture[dict[str, Any]]:
        recovers = tuple(self._recovery_hints)  # a load repairs any suspect state
        return self._worker.submit(
            "load_checkpoint", lambda: self._load_checkpoint(Path(path)), recovers=recovers
        )

    def get_weights(self) -> TrainFuture[dict[str, torch.Tensor]]:
        return self._worker.submit("get_weights", self._get_weights)

    def sampler_weights(self) -> TrainFuture[WeightUpdate]:
        return self._worker.submit("sampler_weights", self._sampler_weights)

    def export_hf(self, path: str | Path, *, adapter_only: bool = False) -> TrainFuture[Path]:
        if adapter_only and not is_lora_model(self.model):
            raise ValueError(
                "export_hf(adapter_only=True): this backend trains the whole model, so it has no "
                "adapter to write; build it with lora_rank > 0, or export the full model"
            )
        return self._worker.submit("export_hf", lambda: self._export_hf(Path(path), adapter_only))

    def close(self) -> None:
        self._worker.close()

    def __enter__(self) -> QueuedBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- checkpoints: listing and lookup (plain, not queued) ---------------------------------------

    def list_checkpoints(self) -> list[Checkpoint]:
        return [Checkpoint(step_of(p) or 0, p) for p in list_checkpoints(self.checkpoint_dir)]

    def find_checkpoint(self, step: int) -> Checkpoint | None:
        path = checkpoint_path(self.checkpoint_dir, step)
        return Checkpoint(step, path) if path.is_dir() else None

    def delete_checkpoint(self, step: int) -> None:
        found = self.find_checkpoint(step)
        if found is not None:
            delete_directory(found.path)

    # -- shared bodies, run on the worker thread ---------------------------------------------------

    def _forward_backward(
        self, batch: Batch, values_checked: bool, loss_fn: LossFn, return_logprobs: bool
    ) -> dict[str, Any]:
        batch = self._prepare(batch, "forward_backward", values_checked)
        weights_BT = token_weights(batch)
        # An RL batch's own log-probs are only read where it carries weight; asked-for ones
        # at every labelled position.
        keep_BT = (batch["labels"] != IGNORE_INDEX) if return_logprobs else weights_BT != 0
        want_logprobs = return_logprobs or batch.get("sampling_logprobs") is not None
        local_weight = float(weights_BT.sum())

        def backward(loss: torch.Tensor) -> None:  # of mean * W_i / R, see the module docstring
            reference = self._reference_weight(local_weight)
            self._touch(GRADIENTS)  # from here a failure leaves half-accumulated gradients
            self._backward(loss * (local_weight / reference if reference else 0.0))

        self.model.train()
        with torch.enable_grad():
            loss, logprobs_BT = self._loss(batch, loss_fn, keep_BT, want_logprobs, backward)
        reference = self._reference_weight(local_weight)
        stats = self._call_stats(loss.detach(), weights_BT)
        self._accum_weight += stats["token_weight"] / reference if reference else 0.0
        self._accum_tokens += stats["num_tokens"]
        self._accum_calls += 1
        if logprobs_BT is not None:
            stats["logprobs"] = logprobs_BT.cpu()
        return stats

    @torch.no_grad()
    def _forward(self, batch: Batch, values_checked: bool, loss_fn: LossFn) -> dict[str, Any]:
        batch = self._prepare(batch, "forward", values_checked)
        weights_BT = token_weights(batch)
        keep_BT = batch["labels"] != IGNORE_INDEX
        self.model.eval()
        loss, logprobs_BT = self._loss(batch, loss_fn, keep_BT, True, None)
        assert logprobs_BT is not None, "asked for"
        stats = self._call_stats(loss, weights_BT)
        stats["logprobs"] = logprobs_BT.cpu()
        return stats

    def _loss(
        self,
        batch: Batch,
        loss_fn: LossFn,
        keep_BT: torch.Tensor,
        want_logprobs: bool,
        backward: Callable[[torch.Tensor], None] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, label log-probs [B, T] or None) of the batch, through the head path when it
        applies, else the model's full logits; `backward`, when given, runs on the loss."""
        if self._uses_head_path(loss_fn, keep_BT):
            computed = self._head_loss(batch, loss_fn, keep_BT, want_logprobs, backward)
            return computed.loss, computed.logprobs_BT
        logits = self._logits(batch)
        loss = _checked_loss(loss_fn(logits, batch))
        if backward is not None:
            backward(loss)
        logprobs_BT = label_logprobs(logits.detach(), batch["labels"]) if want_logprobs else None
        return loss, logprobs_BT

    def _uses_head_path(self, loss_fn: LossFn, keep_BT: torch.Tensor) -> bool:
        """Head and loss at the kept positions only (`rollouts.training.lm_head`): when asked
        for, exact for this loss and model, and some position is kept (a call with none keeps
        the full path, so every rank of a sharded model runs the same collectives)."""
        return (
            self._head_chunk_tokens is not None
            and self._head_owner is not None
            and is_token_local(loss_fn)
            and bool(keep_BT.any())
        )

    def _head_loss(
        self,
        batch: Batch,
        loss_fn: LossFn,
        keep_BT: torch.Tensor,
        want_logprobs: bool,
        backward: Callable[[torch.Tensor], None] | None,
    ) -> HeadLoss:
        assert self._head_owner is not None and self._head_chunk_tokens is not None
        with hidden_states_as_logits(self._head_owner) as head, self._autocast():
            hidden_BTH = logits_of(self.model, batch, causal=True)
        return head_loss(
            hidden_BTH,
            head,
            batch,
            lambda logits, chunk: _checked_loss(loss_fn(logits, chunk)),
            keep_BT,
            chunk_tokens=self._head_chunk_tokens,
            autocast=self._autocast,
            backward=backward,
            want_logprobs=want_logprobs,
        )

    def _loss_for_call(self, loss_fn: LossFn | None, call: str) -> LossFn:
        if loss_fn is None:
            return self.loss_fn
        if not callable(loss_fn):
            raise TypeError(f"{call}(loss_fn=...) takes a loss function, got {type(loss_fn)}")
        return loss_fn

    def _optim_step(
        self,
        learning_rate: float | None = None,
        layer_grad_norms: bool = False,
        adam: AdamSettings | None = None,
    ) -> dict[str, Any]:
        scale = self._normalisation_scale()
        self._touch(GRADIENTS)
        by_layer = self._layer_grad_norms(scale) if layer_grad_norms else None
        configured_clip = self.max_grad_norm
        try:
            if adam is not None:
                self.max_grad_norm = adam.max_grad_norm
            grad_norm = self._clip_gradients(scale)
        finally:
            self.max_grad_norm = configured_clip
        if self._refuses_non_finite() and not math.isfinite(grad_norm):
            self._discard_gradients()
            self._worker.settle()  # the step's gradients are gone; weights and schedule intact
            raise NonFiniteGradientError(
                f"optim_step {self._step + 1}: gradient norm is {grad_norm}; the update was not "
                "applied, the step's gradients were discarded and the weights are those of the "
                "last good step"
            )
        groups = self.optimizer.param_groups
        saved = [dict(group) for group in groups]  # settings only: the params list is shared
        if adam is not None:
            learning_rate = adam.learning_rate
        lr = float(saved[0]["lr"] if learning_rate is None else learning_rate)  # this step's rate
        self._touch(WEIGHTS)
        try:
            for group in groups:
                group["lr"] = lr
                if adam is not None:
                    group.update(betas=adam.betas, eps=adam.eps, weight_decay=adam.weight_decay)
            skipped = self._step_optimizer() is False
        finally:  # the overrides are this step's only; the schedule goes on from its own rates
            for group, settings in zip(groups, saved, strict=True):
                for key in ("lr", "betas", "eps", "weight_decay"):
                    if key in settings:
                        group[key] = settings[key]
        if not skipped:
            if self.scheduler is not None:
                self.scheduler.step()
            self._step += 1
        result = {"step": self._step, "lr": lr, "grad_norm": grad_norm, "skipped": skipped}
        result["num_tokens"] = self._accum_tokens
        if by_layer is not None:
            result["layer_grad_norms"] = by_layer
        self._discard_gradients()
        return result

    def _clear_optimizer_state(self) -> dict[str, Any]:
        cleared = len(self.optimizer.state)
        self.optimizer.state.clear()
        return {"cleared_parameters": cleared}

    def _discard_gradients(self) -> dict[str, Any]:
        discarded = self._accum_calls
        self.optimizer.zero_grad(set_to_none=True)
        self._reset_accumulation()
        return {"discarded_calls": discarded}

    def _save_checkpoint(self, final_path: Path) -> Path:
        if self._accum_calls:
            raise PendingGradientsError(
                f"save_checkpoint: {self._accum_calls} forward_backward call(s) have gradients "
                "not yet applied; call optim_step (or discard_gradients) first so the "
                "checkpoint resumes exactly"
            )
        self._write_checkpoint(final_path)
        return final_path

    # -- gradient accumulation between optimizer steps ---------------------------------------------

    def _reset_accumulation(self) -> None:
        self._accum_weight = 0.0  # sum of W_i / R since the last step
        self._accum_tokens = 0
        self._accum_calls = 0
        self._reference: float | None = None

    def _reference_weight(self, local_weight: float) -> float | None:
        """R of the module docstring: the first non-zero weight of the step ("sum": 1)."""
        if self.normalization == "sum":
            return 1.0
        if self._reference is None and local_weight > 0:
            self._reference = local_weight
        return self._reference

    def _normalisation_scale(self) -> float:
        """1 / accumulated weight for "token_mean", 1 for "sum"; refuses a step with nothing."""
        if self._accum_calls == 0:
            raise NoWeightedTokensError("optim_step with no forward_backward since the last step")
        if self.normalization == "sum" or self._accum_weight > 0:
            return 1.0 if self.normalization == "sum" else 1.0 / self._accum_weight
        calls = self._accum_calls
        self._discard_gradients()
        raise NoWeightedTokensError(
            f"optim_step: the {calls} forward_backward call(s) since the last step carried no "
            f"weighted token{self._where()} (every label -100 or loss_mask 0); they were "
            "discarded and the weights are unchanged"
        )

    # -- per-backend pieces ------------------------------------------------------------------------

    def _check_batch(self, batch: Batch, call: str) -> bool:
        """Layout checks on the caller's thread; value checks too when they cost no sync."""
        check_batch_layout(batch, call)
        if not on_cpu(batch):
            return False
        check_batch_values(batch, call, self._vocab_in, self._vocab_out)
        return True

    def _prepare(self, batch: Batch, call: str, values_checked: bool) -> dict[str, Any]:
        moved = {
            key: value.to(self._device, non_blocking=True)
            if isinstance(value, torch.Tensor)
            else value
            for key, value in batch.items()
        }
        if not values_checked:
            check_batch_values(moved, call, self._vocab_in, self._vocab_out)
        return moved

    def _logits(self, batch: Batch) -> torch.Tensor:
        """The model's logits, divided by the batch's sampling temperature when it has one."""
        with self._autocast():
            logits = logits_of(self.model, batch, causal=self._head_owner is not None)
        return apply_temperature(logits, batch)

    def _autocast(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _touch(self, state: str) -> None:
        self._worker.touch(state)

    def _layer_grad_norms(self, scale: float) -> dict[str, float]:
        """Each layer's gradient norm as the step will see it (after normalisation, before
        clipping); layers as `layer_of` names them."""
        layers = [layer_of(name) for name, p in self.model.named_parameters() if p.requires_grad]
        squared = self._squared_norms_by_layer(layers)
        return {layer: math.sqrt(value) * scale for layer, value in squared.items()}

    def _squared_norms_by_layer(self, layers: list[str]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for layer, param in zip(layers, self._params, strict=True):
            if param.grad is not None:
                totals[layer] = totals.get(layer, 0.0) + float(param.grad.float().square().sum())
        return totals

    def _where(self) -> str:
        return ""

    def _refuses_non_finite(self) -> bool:
        return True

    @abstractmethod
    def _call_stats(self, loss: torch.Tensor, weights_BT: torch.Tensor) -> dict[str, Any]:
        """{"loss", "num_tokens", "token_weight"} of one call (over every rank)."""

    @abstractmethod
    def _clip_gradients(self, scale: float) -> float:
        """Multiply the gradients by `scale`, clip them; return the norm before clipping."""

    @abstractmethod
    def _step_optimizer(self) -> bool | None:
        """Step the optimizer; False when it skipped the update (a gradient scaler's overflow)."""

    @abstractmethod
    def _write_checkpoint(self, final_path: Path) -> None: ...

    @abstractmethod
    def _load_checkpoint(self, path: Path) -> dict[str, Any]: ...

    @abstractmethod
    def _get_weights(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def _sampler_weights(self) -> WeightUpdate: ...

    @abstractmethod
    def _export_hf(self, path: Path, adapter_only: bool) -> Path: ...


# -- pure pieces -----------------------------------------------------------------------------------


def thread_setup(num_threads: int | str | None, device: torch.device) -> Callable[[], None] | None:
    """What the worker thread does first: its intra-op thread count, its current CUDA device.

    Both are per thread in torch, so they are set on the worker itself, never on the caller.
    "auto" times the candidate counts there (`rollouts.core.threads.pick_cpu_threads`).
    """
    if num_threads == AUTO_THREADS:
        pass
    elif isinstance(num_threads, bool) or not (
        num_threads is None or (isinstance(num_threads, int) and num_threads >= 1)
    ):
        raise ValueError(
            f"num_threads must be None (torch's default), 'auto' or an int >= 1, got "
            f"{num_threads!r}"
        )
    if num_threads is None and device.type != "cuda":
        return None

    def setup() -> None:
        if num_threads == AUTO_THREADS:
            torch.set_num_threads(pick_cpu_threads())
        elif num_threads is not None:
            torch.set_num_threads(num_threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)

    return setup


_NOT_MODULE_PARTS = ("weight", "bias", "default", "base_layer")


def layer_of(parameter_name: str) -> str:
    """The layer a parameter belongs to, for per-layer figures: "layers.3" for
    "model.layers.3.mlp.up_proj.weight", else its module's own name ("embed_tokens", "lm_head")."""
    parts = parameter_name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit() and index > 0:
            return f"{parts[index - 1]}.{part}"
    # A PEFT name ("lm_head.lora_A.default.weight") is its module's, without the adapter parts.
    own = [p for p in parts if not p.startswith("lora_") and p not in _NOT_MODULE_PARTS]
    return own[-1] if own else parts[0]


def logits_of(model: nn.Module, batch: Batch, causal: bool = False) -> torch.Tensor:
    """Run the model on the batch's inputs; accept a logits tensor or an output with .logits.

    `causal`: the model is a causal LM (an architecture of `PLAIN_HEAD_MODEL_TYPES`), so an
    attention mask that only right-pads rows changes nothing at the real positions (the causal
    mask already hides every later position) and is dropped: attention then takes its causal
    fast path instead of building a [B, 1, T, T] mask (6% of a step at the 135M shape on CPU).
    The padded positions' outputs differ, so the mask is kept when any of them has a label. Not
    with `position_ids` either: without a mask, transformers reads restarting positions as
    packed rows and blocks attention.
    """
    inputs = {key: batch[key] for key in MODEL_INPUT_KEYS if batch.get(key) is not None}
    if (
        causal
        and "position_ids" not in inputs
        and "attention_mask" in inputs
        and _only_right_padding(inputs["attention_mask"], batch.get("labels"))
    ):
        del inputs["attention_mask"]
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


def _only_right_padding(attention_mask_BT: torch.Tensor, labels_BT: torch.Tensor | None) -> bool:
    """Every row is ones up to its length, then zeros, and no padded position has a label (one
    host sync on an accelerator)."""
    if attention_mask_BT.ndim != 2:
        return False
    real_BT = attention_mask_BT != 0
    lengths_B = real_BT.sum(dim=1, keepdim=True)
    positions_T = torch.arange(attention_mask_BT.shape[1], device=attention_mask_BT.device)
    right_padded_BT = positions_T[None] < lengths_B
    if labels_BT is None or labels_BT.shape != real_BT.shape:
        return False
    unlabelled_padding = (labels_BT == IGNORE_INDEX) | real_BT
    return bool(torch.equal(real_BT, right_padded_BT) and unlabelled_padding.all())


def write_hf_directory(
    path: Path,
    model: nn.Module,
    tokenizer: Any | None,
    *,
    adapter_only: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A complete Hugging Face model directory at `path`, atomically: weights, config and
    generation config (`save_pretrained`), and the tokenizer with its chat template when given,
    so `AutoModelForCausalLM`, `AutoTokenizer` and a pipeline load it on their own.

    A LoRA model is written merged (the plain model with W + scale * B @ A), or with
    `adapter_only` as a PEFT adapter directory (`PeftModel.from_pretrained(base, path)`).
    `state_dict` (full tensors, the model's own names) replaces the live parameters."""
    lora = is_lora_model(model)
    assert lora or not adapter_only, "export_hf refuses adapter_only without LoRA at submission"
    untie = False
    if lora and not adapter_only:
        merged = merged_state_dict(model, state_dict)
        untie = unties_the_head(model)
        model, state_dict = model.get_base_model(), merged
    save_pretrained = require_save_pretrained(model)
    save_kwargs = {} if state_dict is None else {"state_dict": state_dict}
    with atomic_directory(path) as tmp_path:
        save_pretrained(tmp_path, **save_kwargs)
        if untie:  # the merged embedding differs from the head the adapter left as it was
            config_file = tmp_path / "config.json"
            config = json.loads(config_file.read_text())
            config["tie_word_embeddings"] = False
            config_file.write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_path)
    return path


def require_save_pretrained(model: nn.Module) -> Callable[..., Any]:
    """The model's `save_pretrained`, or a TypeError saying export_hf needs a Hugging Face model."""
    save_pretrained = getattr(model, "save_pretrained", None)
    if save_pretrained is None:
        raise TypeError(
            f"{type(model).__name__} has no save_pretrained; export_hf needs a Hugging Face model"
        )
    return save_pretrained


def _checked_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn must return a scalar tensor (the weighted mean), got {shape}")
    return loss


def _vocab_sizes(model: nn.Module) -> tuple[int | None, int | None]:
    """Rows of the input embedding (ids) and of the output head (labels), when the model has them
    (a sharded weight reports its global shape)."""
    sizes: list[int | None] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        sizes.append(int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None)
    return sizes[0], sizes[1]
