"""LoRA through PEFT: the Tier 1 primitive that puts low-rank adapters on a loaded model, and the
adapter's tensors as a rollout engine receives them.

    model = load_hf_model(path, parse_dtype("float32"), None)
    model = apply_lora(model, rank=16, alpha=32)       # a peft.PeftModel; only adapters train
    optimizer = create_adamw_optimizer(model, lr=1e-4)   # over the trainable parameters only

By default the adapters sit on every linear layer of the attention and MLP blocks (every
`nn.Linear` but the LM head); `lm_head=True` and `embeddings=True` add the output head and the
input embedding. Each adapted weight W [out, in] computes W + (alpha / rank) * B @ A with
A [rank, in] (random) and B [out, rank] (zeros), so training starts from the base model exactly.

`adapter_update(model)` is what a LoRA backend hands a rollout engine after a step: for each
adapted base weight, its A, B and scale, CPU copies, a few megabytes where the full model is
gigabytes. The engine keeps its base weights and sets W = W_base + scale * B @ A.

PEFT is an optional dependency: `pip install "rollouts[lora]"`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rollouts.core.weights import WeightUpdate

__all__ = [
    "adapter_update",
    "apply_lora",
    "base_name",
    "is_lora_model",
    "lora_target_modules",
    "merged_state_dict",
    "require_peft",
    "unties_the_head",
]

PEFT_INSTALL_HINT = (
    'LoRA needs the peft package: pip install "rollouts[lora]" (or pip install peft)'
)
ADAPTER_NAME = "default"  # the one adapter a backend trains
_PEFT_PREFIX = "base_model.model."  # PeftModel's prefix before the wrapped model's own names


def require_peft() -> Any:
    """The `peft` module, or an ImportError saying how to install it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(PEFT_INSTALL_HINT) from error
    return peft


def lora_target_modules(model: nn.Module, *, lm_head: bool, embeddings: bool) -> list[str]:
    """The module names LoRA adapts by default: the distinct last names of every `nn.Linear`
    except the LM head ("q_proj", "gate_proj", ...), plus the head and embedding if asked."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }
    for wanted, getter in (
        (lm_head, "get_output_embeddings"),
        (embeddings, "get_input_embeddings"),
    ):
        if not wanted:
            continue
        module = getattr(model, getter, lambda: None)()
        found = [name for name, m in model.named_modules() if m is module and module is not None]
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no {getter.removeprefix('get_')} to adapt"
            )
        names.add(found[0].rsplit(".", 1)[-1])
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer for LoRA to adapt")
    return sorted(names)


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: tuple[str, ...] | list[str] | None = None,
    lm_head: bool = False,
    embeddings: bool = False,
) -> nn.Module:
    """`model` wrapped in LoRA adapters (a `peft.PeftModel`); its base weights are frozen.

    `target_modules` names the modules to adapt (PEFT's matching: a last name such as "q_proj",
    or a regex); None adapts every attention and MLP linear layer (`lora_target_modules`).
    The adapters' A matrices are drawn from torch's global generator: seed it first."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid lora_rank: {rank!r}. Must be an int >= 1")
    if not alpha > 0:
        raise ValueError(f"Invalid lora_alpha: {alpha}. Must be > 0")
    if not 0 <= dropout < 1:
        raise ValueError(f"Invalid lora_dropout: {dropout}. Must lie in [0, 1)")
    peft = require_peft()
    if is_lora_model(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    config = getattr(model, "config", None)
    if lm_head and getattr(config, "tie_word_embeddings", False):
        raise ValueError(
            "lora_lm_head=True, but this model's LM head shares its weight with the input "
            "embedding (tie_word_embeddings): adapt the embedding (lora_embeddings=True) instead"
        )
    targets = list(target_modules) if target_modules else None
    if targets is None:
        targets = lora_target_modules(model, lm_head=lm_head, embeddings=embeddings)
    elif getattr(config, "tie_word_embeddings", False):
        head_name = next(
            (n for n, m in model.named_modules() if m is model.get_output_embeddings()), ""
        )
        if head_name and head_name.rsplit(".", 1)[-1] in targets:
            raise ValueError(
                f"target_modules names the LM head {head_name!r}, which shares its weight with "
                "the input embedding (tie_word_embeddings): adapt the embedding instead"
            )
    lora_config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return peft.get_peft_model(model, lora_config)
    except ValueError as error:  # e.g. a target name that matches no module
        raise ValueError(f"apply_lora(target_modules={targets}): {error}") from None


def is_lora_model(model: nn.Module) -> bool:
    """Whether `model` carries PEFT LoRA adapters."""
    return hasattr(model, "peft_config") and any(_lora_layers(model))


def adapter_update(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None
) -> WeightUpdate:
    """The adapters of a LoRA model as a `WeightUpdate` of kind "adapter" (CPU copies): for each
    adapted weight `w` of the base model, `w::lora_A` [rank, in], `w::lora_B` [out, rank] and
    `scales[w]`, such that the adapted weight is W + scale * B @ A. Embedding adapters are sent
    transposed into that same form. `state_dict` (the model's, gathered to full tensors by a
    sharded backend) is read instead of the live parameters when given."""
    source = state_dict if state_dict is not None else model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for name, layer in _lora_layers(model):
        weight_name = f"{name.removeprefix(_PEFT_PREFIX)}.weight"
        linear_a = f"{name}.lora_A.{ADAPTER_NAME}.weight"
        if linear_a in source:
            a = source[linear_a]
            b = source[f"{name}.lora_B.{ADAPTER_NAME}.weight"]
        else:  # an embedding: its delta is (B @ A)^T, i.e. A^T @ B^T
            a = source[f"{name}.lora_embedding_B.{ADAPTER_NAME}"].T
            b = source[f"{name}.lora_embedding_A.{ADAPTER_NAME}"].T
        tensors[f"{weight_name}::lora_A"] = _cpu_copy(a)
        tensors[f"{weight_name}::lora_B"] = _cpu_copy(b)
        scales[weight_name] = float(layer.scaling[ADAPTER_NAME])
    return WeightUpdate(tensors=tensors, kind="adapter", scales=scales)


def merged_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The base model's state dict, under its own names, with every adapter merged in
    (W + scale * B @ A, added in float32): what `save_pretrained` of the plain model writes.
    CPU tensors; `state_dict` as for `adapter_update`."""
    source = state_dict if state_dict is not None else model.state_dict()
    merged = {
        base_name(name): _cpu_copy(tensor)
        for name, tensor in source.items()
        if ".lora_" not in name
    }
    update = adapter_update(model, source)
    for weight_name in update.scales:
        base = merged[weight_name]
        merged[weight_name] = (base.float() + update.adapter_delta(weight_name).float()).to(
            base.dtype
        )
    return merged


def unties_the_head(model: nn.Module) -> bool:
    """Whether merging changes a tied input embedding but not the LM head that shared it: the
    merged model then needs `tie_word_embeddings=False` (in training the head kept the base)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return False
    embedding = model.get_input_embeddings()
    return any(layer is embedding for _, layer in _lora_layers(model))


def base_name(peft_name: str) -> str:
    """A PEFT parameter name as the plain model names it."""
    return peft_name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().to("cpu", copy=True).contiguous()
