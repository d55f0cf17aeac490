"""The cheap checks every backend runs on a batch before queueing it.

`check_batch_layout` (keys, types, shapes, dtypes) costs nothing and runs on the caller's thread
in `forward_backward` / `forward`, so a malformed batch raises `InvalidBatchError` there, at once,
with nothing queued. `check_batch_values` (ids and labels in range, finite non-negative
`loss_mask`, finite per-token RL inputs) reads the tensors: on CPU tensors it runs on the caller's
thread too; on an accelerator it would wait for the device queue to drain (a host sync that
defeats pipelining), so the backend runs it on its worker instead, where a failure is still a
refusal: nothing has been touched yet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from rollouts.training.errors import InvalidBatchError
from rollouts.training.losses import IGNORE_INDEX

__all__ = ["PER_TOKEN_FLOAT_KEYS", "check_batch_layout", "check_batch_values", "on_cpu"]

SHAPED_LIKE_IDS = ("labels", "attention_mask", "position_ids", "loss_mask")
# Per-token inputs of the RL losses: when present they must match the labels and be finite.
PER_TOKEN_FLOAT_KEYS = ("advantages", "sampling_logprobs", "reference_logprobs")


def check_batch_layout(batch: Any, call: str) -> None:
    """Keys, tensor types, shapes and dtypes; raise `InvalidBatchError` naming the field."""
    if not isinstance(batch, Mapping):
        raise InvalidBatchError(f"{call}: a batch is a dict of tensors, got {type(batch).__name__}")
    for key in ("input_ids", "labels"):
        if key not in batch or batch[key] is None:
            raise InvalidBatchError(
                f"{call}: the batch needs {key!r} (a [B, T] int64 tensor); got keys {sorted(batch)}"
            )
    ids = _tensor(batch, "input_ids", call)
    if ids.ndim != 2 or ids.numel() == 0:
        raise InvalidBatchError(
            f"{call}: batch['input_ids'] must be a non-empty [B, T] tensor, got shape "
            f"{tuple(ids.shape)}"
        )
    for key in (*SHAPED_LIKE_IDS, *PER_TOKEN_FLOAT_KEYS):
        if batch.get(key) is None:
            continue
        value = _tensor(batch, key, call)
        if value.shape != ids.shape:
            raise InvalidBatchError(
                f"{call}: batch[{key!r}] has shape {tuple(value.shape)}, expected the "
                f"input_ids' shape {tuple(ids.shape)}"
            )
    for key in ("input_ids", "labels", "position_ids"):
        value = batch.get(key)
        if value is not None and (value.is_floating_point() or value.dtype == torch.bool):
            raise InvalidBatchError(
                f"{call}: batch[{key!r}] must hold integers (int64), got dtype {value.dtype}"
            )
    _check_temperature(batch.get("temperature"), call)


def check_batch_values(
    batch: Mapping[str, Any], call: str, vocab_in: int | None, vocab_out: int | None
) -> None:
    """Ids in [0, vocab_in), labels in [0, vocab_out) or -100, finite non-negative loss_mask."""
    _check_range(batch["input_ids"], "input_ids", call, vocab_in, allow_ignore=False)
    _check_range(batch["labels"], "labels", call, vocab_out, allow_ignore=True)
    loss_mask = batch.get("loss_mask")
    if loss_mask is not None and loss_mask.is_floating_point():
        if not bool(torch.isfinite(loss_mask).all()):
            raise InvalidBatchError(f"{call}: batch['loss_mask'] holds NaN or inf")
        if bool((loss_mask < 0).any()):
            raise InvalidBatchError(
                f"{call}: batch['loss_mask'] holds negative weights (min "
                f"{float(loss_mask.min())}); weights must be >= 0"
            )
    elif loss_mask is not None and loss_mask.dtype != torch.bool and bool((loss_mask < 0).any()):
        raise InvalidBatchError(f"{call}: batch['loss_mask'] holds negative weights")
    for key in PER_TOKEN_FLOAT_KEYS:
        value = batch.get(key)
        if value is not None and not bool(torch.isfinite(value.float()).all()):
            raise InvalidBatchError(f"{call}: batch[{key!r}] holds NaN or inf")


def on_cpu(batch: Mapping[str, Any]) -> bool:
    """True when every tensor of the batch is in host memory (value checks cost no sync)."""
    return all(v.device.type == "cpu" for v in batch.values() if isinstance(v, torch.Tensor))


def _check_temperature(value: Any, call: str) -> None:
    if value is None:
        return
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise InvalidBatchError(
            f"{call}: batch['temperature'] must be a number > 0 (the sampling temperature the "
            f"logits are divided by), got {value!r}"
        )


def _tensor(batch: Mapping[str, Any], key: str, call: str) -> torch.Tensor:
    value = batch[key]
    if not isinstance(value, torch.Tensor):
        raise InvalidBatchError(
            f"{call}: batch[{key!r}] must be a torch.Tensor, got {type(value).__name__}"
        )
    return value


def _check_range(
    value: torch.Tensor, key: str, call: str, vocab: int | None, *, allow_ignore: bool
) -> None:
    valid = value >= 0
    if vocab is not None:
        valid &= value < vocab
    if allow_ignore:
        valid |= value == IGNORE_INDEX
    if bool(valid.all()):
        return
    bad = value[~valid]
    allowed = f"[0, {vocab})" if vocab is not None else ">= 0"
    allowed += " or -100 (no loss)" if allow_ignore else ""
    position = tuple(int(i) for i in (~valid).nonzero()[0])
    raise InvalidBatchError(
        f"{call}: batch[{key!r}] holds {bad.numel()} value(s) outside {allowed}, e.g. "
        f"{int(bad[0])} at position {position}"
    )
