"""Tier 1 primitives and Tier 2 convenience factories for building a backend.

Tier 1 are pure functions with explicit arguments and no retained state: `parse_dtype`,
`compute_device_map_single_gpu`, `load_hf_model`, `create_adamw_optimizer`,
`create_cross_entropy_loss`, `create_warmup_scheduler` (and its cosine shorthand).

Tier 2 (`create_pytorch_backend`, `create_backend_with_scheduler`) calls only Tier 1 and the
backend constructor, so any Tier 2 call can be replaced by the few Tier 1 calls it makes. Its
keyword arguments are the fields of `BackendOptions`, the same for `create_fsdp_backend`:

    model = load_hf_model(path, parse_dtype("float32"), compute_device_map_single_gpu("cpu", 0))
    optimizer = create_adamw_optimizer(model, lr=1e-4)
    scheduler = create_warmup_scheduler(optimizer, 10, 100, "cosine")
    backend = PyTorchTrainingBackend(model, optimizer, create_cross_entropy_loss(), ckpt, "cpu",
                                     scheduler)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rollouts.core.worker import QUEUE_DEPTH_MAX_DEFAULT
from rollouts.training.backends.lora import apply_lora, require_peft
from rollouts.training.backends.protocol import NORMALIZATIONS
from rollouts.training.backends.pytorch import PyTorchTrainingBackend, validate_device
from rollouts.training.lm_head import HEAD_CHUNK_AUTO, head_chunk_tokens
from rollouts.training.losses import LossFn, cross_entropy_loss

__all__ = [
    "DECAY_STYLES",
    "DTYPES",
    "BackendOptions",
    "compute_device_map_single_gpu",
    "create_adamw_optimizer",
    "create_backend_with_scheduler",
    "create_cross_entropy_loss",
    "create_pytorch_backend",
    "create_warmup_cosine_scheduler",
    "create_warmup_scheduler",
    "enable_activation_checkpointing",
    "load_hf_model",
    "load_hf_tokenizer",
    "parse_dtype",
    "validate_schedule",
    "warmup_steps_for",
    "with_options_signature",
]

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
}
DEVICE_TYPES = ("cuda", "cpu", "mps")
DECAY_STYLES = ("cosine", "linear", "constant")
WARMUP_START_FACTOR = 0.1  # warmup ramps from 0.1x to 1.0x of the base learning rate
LR_WARN_ABOVE = 1.0

# -- Tier 1 ----------------------------------------------------------------------------------------


def parse_dtype(name: str) -> torch.dtype:
    """ "bfloat16" | "float32" | "float16" -> torch.dtype."""
    if name not in DTYPES:
        raise ValueError(f"Invalid dtype: {name!r}. Must be one of {list(DTYPES)}")
    return DTYPES[name]


def compute_device_map_single_gpu(device_type: str, gpu_rank: int) -> dict[str, int] | None:
    """`{"": gpu_rank}` for CUDA (the whole model on that GPU); None for CPU and MPS."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(
            f"Invalid device_type: {device_type!r}. Must be one of {list(DEVICE_TYPES)}"
        )
    if not isinstance(gpu_rank, int) or gpu_rank < 0:
        raise ValueError(f"Invalid gpu_rank: {gpu_rank!r}. Must be an int >= 0")
    return {"": gpu_rank} if device_type == "cuda" else None


def load_hf_model(
    model_name_or_path: str | Path,
    torch_dtype: torch.dtype,
    device_map: dict[str, int] | None,
) -> nn.Module:
    """A Hugging Face causal LM from a local directory, or from a hub id when online."""
    from transformers import AutoModelForCausalLM

    source = Path(model_name_or_path)
    is_local = source.exists() or str(model_name_or_path).startswith((".", "/", "~"))
    if is_local and not (source / "config.json").is_file():
        raise FileNotFoundError(
            f"model path {str(source)!r} is not a Hugging Face model directory (no config.json)"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(model_name_or_path), dtype=torch_dtype, device_map=device_map
        )
    except OSError as error:
        if is_local:
            raise OSError(f"could not load the model in {str(source)!r}: {error}") from error
        raise OSError(
            f"could not load model {str(model_name_or_path)!r}: not a local directory, and the hub "
            f"lookup failed ({error})"
        ) from error


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def load_hf_tokenizer(model_name_or_path: str | Path) -> Any | None:
    """The tokenizer saved beside a local model (with its chat template), or None when the
    directory holds none (a hub id is loaded when online)."""
    from transformers import AutoTokenizer

    source = Path(model_name_or_path)
    if source.is_dir() and not any((source / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(model_name_or_path))


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (less memory, about a third more compute).

    Non-reentrant checkpointing, which both one device and FSDP2's hooks support."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"activation_checkpointing=True, but {type(model).__name__} is not a Hugging Face "
            "model that supports gradient checkpointing"
        )
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.2x; gradient_checkpointing_enable is deprecated
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def create_adamw_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; beta2=0.95 is the usual LLM choice.

    `fused=None` picks torch's fused kernel when every parameter is on CPU or CUDA in a floating
    dtype (it is the fastest and what `transformers.Trainer` uses); pass False for the for-each one.
    """
    if not lr > 0:
        raise ValueError(f"Invalid lr: {lr}. Must be > 0")
    if lr > LR_WARN_ABOVE:
        warnings.warn(
            f"lr={lr} is above {LR_WARN_ABOVE}; training will likely diverge", stacklevel=2
        )
    if len(betas) != 2 or not all(0 < beta < 1 for beta in betas):
        raise ValueError(f"Invalid betas: {betas}. Both must lie in (0, 1)")
    if not eps > 0:
        raise ValueError(f"Invalid eps: {eps}. Must be > 0")
    if not weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay}. Must be >= 0")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameter")
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused
    )


def create_cross_entropy_loss() -> LossFn:
    """`loss_fn(logits, batch)`: the token-weighted mean NLL (see `rollouts.training.losses`)."""
    return cross_entropy_loss


def create_warmup_scheduler(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    decay_style: str = "cosine",
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup 0.1x -> 1.0x, then cosine/linear decay to `min_lr_ratio`x, or constant 1.0x."""
    validate_schedule(num_warmup_steps, num_training_steps, decay_style, min_lr_ratio)
    factor = partial(
        _warmup_decay_factor,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        decay_style=decay_style,
        min_lr_ratio=min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def create_warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """`create_warmup_scheduler` with `decay_style="cosine"`."""
    return create_warmup_scheduler(
        optimizer, num_warmup_steps, num_training_steps, "cosine", min_lr_ratio
    )


def warmup_steps_for(num_training_steps: int, warmup_ratio: float) -> int:
    """`max(1, int(num_training_steps * warmup_ratio))`, the Tier 2 warmup rule."""
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"Invalid warmup_ratio: {warmup_ratio}. Must lie in [0, 1)")
    return max(1, int(num_training_steps * warmup_ratio))


def validate_schedule(
    num_warmup_steps: int, num_training_steps: int, decay_style: str, min_lr_ratio: float
) -> None:
    """Raise ValueError naming the first bad schedule argument."""
    if decay_style not in DECAY_STYLES:
        raise ValueError(
            f"Invalid decay_style: {decay_style!r}. Must be one of {list(DECAY_STYLES)}"
        )
    if num_warmup_steps < 0:
        raise ValueError(f"Invalid num_warmup_steps: {num_warmup_steps}. Must be >= 0")
    if not num_training_steps > num_warmup_steps:
        raise ValueError(
            f"Invalid num_training_steps: {num_training_steps}. Must be > num_warmup_steps "
            f"({num_warmup_steps})"
        )
    if not 0 < min_lr_ratio <= 1:
        raise ValueError(f"Invalid min_lr_ratio: {min_lr_ratio}. Must lie in (0, 1]")


def _warmup_decay_factor(
    step: int,
    *,
    num_warmup_steps: int,
    num_training_steps: int,
    decay_style: str,
    min_lr_ratio: float,
) -> float:
    # A module-level function (not a closure) so that the scheduler's state dict pickles.
    if step < num_warmup_steps:
        return WARMUP_START_FACTOR + (1.0 - WARMUP_START_FACTOR) * step / num_warmup_steps
    if decay_style == "constant":
        return 1.0
    progress = min(1.0, (step - num_warmup_steps) / (num_training_steps - num_warmup_steps))
    if decay_style == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -- Tier 2 ----------------------------------------------------------------------------------------
#
# Both engines' factories take the keyword arguments of `BackendOptions`, with its defaults, so a
# script swaps one device for FSDP by changing the factory's name (and launching with torchrun).


@dataclass(frozen=True, kw_only=True)
class BackendOptions:
    """What a Tier 2 factory builds, besides the model path and the checkpoint directory."""

    device_type: str = "cuda"  # "cuda", "cpu" or "mps" (FSDP: "cuda" or "cpu")
    gpu_rank: int | None = None  # one device: the GPU index (None: 0); FSDP: LOCAL_RANK's GPU
    dtype: str = "float32"  # weights and optimizer state: "float32", "bfloat16" or "float16"
    mixed_precision: str | None = None  # compute dtype ("bfloat16"; "float16" one device only)
    learning_rate: float = 1e-4  # peak learning rate of AdamW
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    loss_fn: LossFn | None = None  # None: token-weighted cross-entropy
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still reported)
    normalization: str = "token_mean"  # or "sum"; see rollouts.training.backends.protocol
    num_training_steps: int | None = None  # None: a constant learning rate, no scheduler
    warmup_ratio: float = 0.03  # warmup steps = max(1, int(num_training_steps * ratio))
    decay_style: str = "cosine"  # after warmup: "cosine", "linear" or "constant"
    min_lr_ratio: float = 0.1  # the final learning rate as a fraction of the peak
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # The backend worker's intra-op threads: None (torch's), "auto" (timed when the worker
    # starts: 1 on a box others keep busy, all cores on a quiet one), or a count.
    num_threads: int | str | None = None
    queue_depth_max: int = QUEUE_DEPTH_MAX_DEFAULT  # calls pending at once, at most
    # The LM head and loss only at weighted positions, this many logits at a time ("auto": 2^26
    # from a 4,096-token vocabulary up); None: the model's own full [B, T, V] logits. See
    # rollouts.training.lm_head.
    head_chunk_logits: int | str | None = HEAD_CHUNK_AUTO
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (peft); 0: the whole model
    lora_alpha: float = 16.0  # the adapters' scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ()  # (): every attention and MLP linear layer
    lora_lm_head: bool = False  # adapt the LM head too
    lora_embeddings: bool = False  # adapt the input embedding too
    lora_init_seed: int = 0  # seeds the adapters' random A (alike on every rank), not the run

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.mixed_precision is not None:
            parse_dtype(self.mixed_precision)
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(
                f"Invalid device_type: {self.device_type!r}. Must be one of {list(DEVICE_TYPES)}"
            )
        if self.gpu_rank is not None and (not isinstance(self.gpu_rank, int) or self.gpu_rank < 0):
            raise ValueError(f"Invalid gpu_rank: {self.gpu_rank!r}. Must be None or an int >= 0")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Invalid normalization: {self.normalization!r}. Must be one of {NORMALIZATIONS}"
            )
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(
                f"Invalid decay_style: {self.decay_style!r}. Must be one of {list(DECAY_STYLES)}"
            )
        schedule = self.schedule()  # checks warmup_ratio, num_training_steps, min_lr_ratio
        if schedule is not None:
            validate_schedule(*schedule)
        self._check_optimizer_fields()
        self._check_lora_fields()
        head_chunk_tokens(self.head_chunk_logits, None)  # refuses a bad value, naming it

    def _check_lora_fields(self) -> None:
        rank = self.lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"Invalid lora_rank: {rank!r}. Must be an int >= 0 (0: no LoRA)")
        if rank == 0:
            asked = [
                name
                for name in ("lora_target_modules", "lora_lm_head", "lora_embeddings")
                if getattr(self, name)
            ]
            if asked:
                raise ValueError(f"{asked} set, but lora_rank=0 (no LoRA); set lora_rank > 0")
            return
        if not self.lora_alpha > 0:
            raise ValueError(f"Invalid lora_alpha: {self.lora_alpha}. Must be > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"Invalid lora_dropout: {self.lora_dropout}. Must lie in [0, 1)")
        require_peft()  # before any model is loaded

    def _check_optimizer_fields(self) -> None:
        # The same rules as create_adamw_optimizer, checked before a model is loaded.
        if not self.learning_rate > 0:
            raise ValueError(f"Invalid learning_rate: {self.learning_rate}. Must be > 0")
        if len(self.adam_betas) != 2 or not all(0 < beta < 1 for beta in self.adam_betas):
            raise ValueError(f"Invalid adam_betas: {self.adam_betas}. Both must lie in (0, 1)")
        if not self.weight_decay >= 0:
            raise ValueError(f"Invalid weight_decay: {self.weight_decay}. Must be >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {self.max_grad_norm}. Must be > 0 or None")
        threads = self.num_threads
        if threads not in (None, "auto") and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ValueError(f"Invalid num_threads: {threads!r}. Must be None, 'auto' or >= 1")
        if self.queue_depth_max < 1:
            raise ValueError(f"Invalid queue_depth_max: {self.queue_depth_max}. Must be >= 1")

    @classmethod
    def from_kwargs(cls, factory: str, kwargs: dict[str, Any]) -> BackendOptions:
        """The options of `kwargs`, or a TypeError naming an unknown keyword and the valid ones."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"{factory}() got unknown option(s) {unknown}; valid: {sorted(names)}")
        return cls(**kwargs)

    def schedule(self) -> tuple[int, int, str, float] | None:
        """(warmup steps, training steps, decay style, min ratio), or None for a constant rate."""
        if self.num_training_steps is None:
            return None
        num_warmup_steps = warmup_steps_for(self.num_training_steps, self.warmup_ratio)
        return num_warmup_steps, self.num_training_steps, self.decay_style, self.min_lr_ratio

    def backend_kwargs(self) -> dict[str, Any]:
        """The keyword arguments both backend constructors take, from these options."""
        return {
            "max_grad_norm": self.max_grad_norm,
            "normalization": self.normalization,
            "queue_depth_max": self.queue_depth_max,
            "num_threads": self.num_threads,
            "head_chunk_logits": self.head_chunk_logits,
        }

    def with_lora(self, model: nn.Module) -> nn.Module:
        """The model with LoRA adapters (Tier 1 `apply_lora`) when lora_rank > 0, else itself."""
        if not self.lora_rank:
            return model
        devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
        # The adapters' A come from this seed, on every rank alike, and the caller's own random
        # stream (data order, dropout) is left where it was.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.lora_init_seed)
            return apply_lora(
                model,
                rank=self.lora_rank,
                alpha=self.lora_alpha,
                dropout=self.lora_dropout,
                target_modules=self.lora_target_modules or None,
                lm_head=self.lora_lm_head,
                embeddings=self.lora_embeddings,
            )

    def compute_dtype(self) -> torch.dtype | None:
        return parse_dtype(self.mixed_precision) if self.mixed_precision else None

    def optimizer_and_scheduler(
        self, model: nn.Module
    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR | None]:
        """AdamW over the model's trainable parameters and the schedule, from Tier 1."""
        optimizer = create_adamw_optimizer(
            model, self.learning_rate, self.adam_betas, weight_decay=self.weight_decay
        )
        schedule = self.schedule()
        return optimizer, create_warmup_scheduler(optimizer, *schedule) if schedule else None


def with_options_signature(factory: Callable[..., Any]) -> Callable[..., Any]:
    """Show the `BackendOptions` fields in `help(factory)` and `inspect.signature(factory)`:
    the factory takes them as `**options`, so their defaults are written once."""
    signature = inspect.signature(factory)
    fixed = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    named = {p.name for p in fixed}  # e.g. num_training_steps, positional in *_with_scheduler
    defaults = BackendOptions()
    options = [
        inspect.Parameter(
            field.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=getattr(defaults, field.name),
            annotation=field.type,
        )
        for field in dataclasses.fields(BackendOptions)
        if field.name not in named
    ]
    factory.__signature__ = signature.replace(parameters=[*fixed, *options])  # type: ignore
    return factory


@with_options_signature
def create_pytorch_backend(
    model_name: str | Path, checkpoint_dir: str | Path, **options: Any
) -> PyTorchTrainingBackend:
    """Load the model (and the tokenizer saved beside it, which `export_hf` writes back), build
    AdamW, the loss and (given `num_training_steps`) the warmup schedule, and place it all on
    the device: a ready backend. Options: `BackendOptions`."""
    opts = BackendOptions.from_kwargs("create_pytorch_backend", options)
    gpu_rank = opts.gpu_rank or 0
    device_map = compute_device_map_single_gpu(opts.device_type, gpu_rank)
    device = validate_device(f"cuda:{gpu_rank}" if opts.device_type == "cuda" else opts.device_type)
    model = load_hf_model(model_name, parse_dtype(opts.dtype), device_map).to(device)
    model = opts.with_lora(model)
    if opts.activation_checkpointing:
        enable_activation_checkpointing(model)
    optimizer, scheduler = opts.optimizer_and_scheduler(model)
    loss_fn = opts.loss_fn or create_cross_entropy_loss()
    kwargs = opts.backend_kwargs() | {"autocast_dtype": opts.compute_dtype()}
    kwargs["tokenizer"] = load_hf_tokenizer(model_name)  # export_hf writes it with the weights
    return PyTorchTrainingBackend(
        model, optimizer, loss_fn, checkpoint_dir, device, scheduler, **kwargs
    )


@with_options_signature
def create_backend_with_scheduler(
    model_name: str | Path, checkpoint_dir: str | Path, num_training_steps: int, **options: Any
) -> tuple[PyTorchTrainingBackend, torch.optim.lr_scheduler.LambdaLR]:
    """`create_pytorch_backend` with a warmup schedule: `(backend, scheduler)`."""
    backend = create_pytorch_backend(
        model_name, checkpoint_dir, num_training_steps=num_training_steps, **options
    )
    assert backend.scheduler is not None, "a schedule was asked for"
    return backend, backend.scheduler  # type: ignore[return-value]
