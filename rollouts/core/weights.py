"""`WeightUpdate`: what a training backend hands a rollout engine after a step (the seam between
the two).

A backend's `sampler_weights()` returns one; an engine's `load_weights(update, version)` applies
it. The `kind` says how to apply it, so the transfer can change without changing either loop:

- "full": `tensors` is the whole state dict (CPU copies, never views of live parameters); the
  engine replaces its weights with it. What every backend produces today.
- "adapter" (planned, for LoRA): only the adapter tensors; the engine keeps its base weights.
- An in-place or NCCL transfer for a GPU engine would be a further kind, carrying a handle
  instead of tensors.

An engine refuses a kind it cannot apply, naming it, rather than guessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["WEIGHT_UPDATE_KINDS", "WeightUpdate", "as_weight_update"]

WEIGHT_UPDATE_KINDS = ("full",)


@dataclass(frozen=True)
class WeightUpdate:
    """Weights for a rollout engine: a `kind` and its tensors (see the module docstring)."""

    tensors: Mapping[str, torch.Tensor]
    kind: str = "full"

    def __post_init__(self) -> None:
        if self.kind not in WEIGHT_UPDATE_KINDS:
            raise ValueError(
                f"WeightUpdate.kind={self.kind!r}; must be one of {WEIGHT_UPDATE_KINDS}"
            )
        for name, tensor in self.tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"WeightUpdate.tensors[{name!r}] is a {type(tensor).__name__}")

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
