"""`WeightUpdate`: what a training backend hands a rollout engine after a step (the seam between
the two).

A backend's `sampler_weights()` returns one; an engine's `load_weights(update, version)` applies
it. The `kind` says how to apply it, so the transfer can change without changing either loop:

- "full": `tensors` is the whole state dict (CPU copies, never views of live parameters); the
  engine replaces its weights with it. What every backend produces today.
- "adapter" (LoRA): for each adapted base weight `w`, `tensors["w::lora_A"]` [rank, in],
  `tensors["w::lora_B"]` [out, rank] and `scales[w]`; the engine keeps its base weights and
  sets W = W_base + scale * B @ A. A few megabytes where the full model is gigabytes.
- "remote": no tensors; `location` names weights saved on a service (a Tinker sampler path),
  which a remote engine samples from.
- An in-place or NCCL transfer for a GPU engine would be a further kind, carrying a handle
  instead of tensors.

An engine refuses a kind it cannot apply, naming it, rather than guessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["ADAPTER_SUFFIXES", "WEIGHT_UPDATE_KINDS", "WeightUpdate", "as_weight_update"]

WEIGHT_UPDATE_KINDS = ("full", "adapter", "remote")
ADAPTER_SUFFIXES = ("::lora_A", "::lora_B")


@dataclass(frozen=True)
class WeightUpdate:
    """Weights for a rollout engine: a `kind` and its tensors (see the module docstring)."""

    tensors: Mapping[str, torch.Tensor]
    kind: str = "full"
    scales: Mapping[str, float] = field(default_factory=dict)  # "adapter": w -> alpha / rank
    location: str = ""  # "remote": where the service keeps the weights

    def __post_init__(self) -> None:
        if self.kind not in WEIGHT_UPDATE_KINDS:
            raise ValueError(
                f"WeightUpdate.kind={self.kind!r}; must be one of {WEIGHT_UPDATE_KINDS}"
            )
        for name, tensor in self.tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"WeightUpdate.tensors[{name!r}] is a {type(tensor).__name__}")
        if (self.kind == "remote") != bool(self.location) or (
            self.kind == "remote" and self.tensors
        ):
            raise ValueError("WeightUpdate: kind 'remote' has a location and no tensors; the "
                             "other kinds have tensors and no location")  # fmt: skip
        if self.kind == "adapter":
            self._check_adapter()
        elif self.scales:
            raise ValueError("WeightUpdate.scales belong to kind 'adapter' only")

    def _check_adapter(self) -> None:
        expected = {f"{w}{suffix}" for w in self.scales for suffix in ADAPTER_SUFFIXES}
        if set(self.tensors) != expected:
            extra, missing = (
                sorted(set(self.tensors) - expected),
                sorted(expected - set(self.tensors)),
            )
            raise ValueError(
                f"WeightUpdate(kind='adapter'): tensors must be w::lora_A and w::lora_B for each "
                f"w of scales; unexpected {extra[:3]}, missing {missing[:3]}"
            )
        for weight_name in self.scales:
            a, b = (self.tensors[f"{weight_name}{s}"] for s in ADAPTER_SUFFIXES)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"WeightUpdate(kind='adapter'): {weight_name}: lora_A {tuple(a.shape)} and "
                    f"lora_B {tuple(b.shape)} must be [rank, in] and [out, rank]"
                )

    def adapter_delta(self, weight_name: str) -> torch.Tensor:
        """scale * B @ A of one adapted weight [out, in] (kind "adapter")."""
        a, b = (self.tensors[f"{weight_name}{s}"] for s in ADAPTER_SUFFIXES)
        return self.scales[weight_name] * (b @ a)

    @property
    def num_bytes(self) -> int:
        """Bytes the tensors occupy: what one transfer moves."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def as_weight_update(weights: WeightUpdate | Mapping[str, torch.Tensor]) -> WeightUpdate:
    """A `WeightUpdate` as is; a plain state dict as a "full" one."""
    if isinstance(weights, WeightUpdate):
        return weights
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"weights must be a WeightUpdate or a state dict (name -> tensor), got "
            f"{type(weights).__name__}"
        )
    return WeightUpdate(tensors=weights)
