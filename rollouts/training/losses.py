"""Loss functions with the backend signature `loss_fn(logits, batch) -> scalar`.

The convention every loss here follows, and every backend relies on:

- `batch["labels"]` [B, T] are the targets aligned with `logits` [B, T, V]; `labels == -100` is
  ignored. An optional `batch["loss_mask"]` [B, T] holds per-token weights (0 = ignored).
- The scalar returned is the weighted *mean* over the batch's tokens:
  sum(w * per_token_loss) / sum(w), with w = `token_weights(batch)`.

Because `token_weights` is shared, a backend can turn the mean back into the weighted sum
(mean * sum(w)) and normalise by the whole optimizer step's weight, which is what makes gradient
accumulation and data parallelism exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "LossFn",
    "cross_entropy_loss",
    "label_logprobs",
    "token_weights",
    "weighted_mean",
]


def token_weights(batch: Batch) -> torch.Tensor:
    """Per-token weights [B, T], float32: `loss_mask` (default 1) where labels != -100, else 0."""
    labels = batch["labels"]
    weights = (labels != IGNORE_INDEX).to(torch.float32)
    loss_mask = batch.get("loss_mask")
    if loss_mask is not None:
        if loss_mask.shape != labels.shape:
            raise ValueError(
                f"loss_mask has shape {tuple(loss_mask.shape)}, expected the labels' shape "
                f"{tuple(labels.shape)}"
            )
        weights = weights * loss_mask.to(torch.float32)
    return weights


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability [B, T] (float32) of each label under `logits` [B, T, V]; 0 where ignored."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits have shape {tuple(logits.shape)} but labels {tuple(labels.shape)}; labels "
            "must be aligned with the logits (labels[b, t] is the target of logits[b, t])"
        )
    safe_labels = labels.clamp(min=0)  # -100 would index out of range; those positions get 0
    logprobs_BT = -F.cross_entropy(
        logits.float().flatten(0, 1), safe_labels.flatten(), reduction="none"
    ).view(labels.shape)
    return logprobs_BT.masked_fill(labels == IGNORE_INDEX, 0.0)


def weighted_mean(per_token_BT: torch.Tensor, weights_BT: torch.Tensor) -> torch.Tensor:
    """sum(w * x) / sum(w); exactly 0 (still differentiable) when every weight is 0."""
    total_weight = weights_BT.sum()
    weighted_sum = (per_token_BT * weights_BT).sum()
    return weighted_sum / total_weight.clamp(min=torch.finfo(torch.float32).tiny)


def cross_entropy_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Token-weighted mean negative log-likelihood of `batch["labels"]`."""
    labels = batch["labels"]
    if batch.get("loss_mask") is None:
        # Unweighted: summing inside cross_entropy and dividing by the count rounds exactly like
        # F.cross_entropy(reduction="mean"), so a plain training loop is matched bit for bit.
        nll_sum = F.cross_entropy(
            logits.float().flatten(0, 1),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return nll_sum / (labels != IGNORE_INDEX).sum().clamp(min=1)
    return weighted_mean(-label_logprobs(logits, labels), token_weights(batch))
