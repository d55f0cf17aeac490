"""The LM head and the loss only at the positions that count, a chunk of positions at a time.

A causal LM's logits [B, T, V] are the largest tensors of a training step: at a vocabulary of
50k-150k and thousands of tokens per row, float32 logits and their gradient take gigabytes, and
with assistant-only masks half of the positions or more feed nothing into the loss. `head_loss`
takes the model's final hidden states [B, T, H] instead, keeps the N positions that matter, and
runs head and loss on `chunk_tokens` of them at a time. Each chunk's backward runs at once, into
a detached copy of the kept hidden states and into the head's weights, so at most one chunk's
logits exist; the decoder's backward then runs once, from the kept states' gradient.

This is exact for a *token-local* loss: a weighted mean, over tokens, of a per-token value that
depends on that token's logits and batch entries only (every loss of `rollouts.training.losses`,
marked by `is_token_local`). For such a loss, with W_c the token weight of chunk c,
    loss(batch) = sum_c loss(chunk c) * W_c / W,
so the loss and its gradient equal those of the full logits up to float summation order.

The hidden states come from the model's own forward with its head swapped for the identity
(`hidden_states_as_logits`), so wrappers that hook the whole model's forward (FSDP2's
all-gathers, PEFT) still run. Only architectures whose forward applies the head and nothing
after it are swapped (`PLAIN_HEAD_MODEL_TYPES`); others (logit soft-capping, logit scales)
keep computing their full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from rollouts.training.losses import (
    Batch,
    LossFn,
    apply_temperature,
    label_logprobs,
    token_weights,
)

__all__ = [
    "HEAD_CHUNK_AUTO",
    "HEAD_CHUNK_LOGITS_AUTO",
    "HEAD_PATH_VOCAB_MIN",
    "PLAIN_HEAD_MODEL_TYPES",
    "HeadLoss",
    "head_chunk_tokens",
    "head_loss",
    "hidden_states_as_logits",
    "plain_head_owner",
]

# transformers architectures whose CausalLM forward ends in `logits = self.lm_head(hidden)` with
# nothing applied after it (checked against transformers 5.24). Gemma 2/3 soft-cap their logits,
# Cohere and Granite scale them: those keep the full path.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "gemma",
        "llama",
        "mistral",
        "mixtral",
        "olmo2",
        "phi3",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "smollm3",
    }
)

# Logit elements per chunk: 2^26 float32 values are 256 MiB (their gradient as much again), so
# a chunk is about 1,360 positions at SmolLM2's vocabulary and about 440 at Qwen2.5's.
HEAD_CHUNK_LOGITS_AUTO = 2**26
# Below this vocabulary the head is a small share of a step, and gathering the kept positions
# and the second backward cost about what they save (measured on the 1.2M-parameter tiny model,
# vocabulary 70: 1-4% slower), so "auto" keeps the full logits there.
HEAD_PATH_VOCAB_MIN = 4096
HEAD_CHUNK_AUTO = "auto"
HEAD_CHUNK_TOKENS_UNKNOWN_VOCAB = 4096


def head_chunk_tokens(head_chunk_logits: int | str | None, vocab_size: int | None) -> int | None:
    """Positions per chunk of the head path, or None for the model's full logits.

    `head_chunk_logits`: "auto" (chunks of `HEAD_CHUNK_LOGITS_AUTO` logits when the vocabulary
    has at least `HEAD_PATH_VOCAB_MIN` tokens, else the full logits), a positive int (chunks of
    about that many logits, whatever the vocabulary) or None (the full logits). A bad value is a
    ValueError naming it.
    """
    if head_chunk_logits is None:
        return None
    if head_chunk_logits == HEAD_CHUNK_AUTO:
        if vocab_size is None or vocab_size < HEAD_PATH_VOCAB_MIN:
            return None
        head_chunk_logits = HEAD_CHUNK_LOGITS_AUTO
    if isinstance(head_chunk_logits, bool) or not isinstance(head_chunk_logits, int):
        raise ValueError(
            f"head_chunk_logits must be 'auto', a positive int or None, got {head_chunk_logits!r}"
        )
    if head_chunk_logits <= 0:
        raise ValueError(f"head_chunk_logits must be > 0, got {head_chunk_logits}")
    if not vocab_size:  # a head whose width is not known: a fixed number of positions
        return HEAD_CHUNK_TOKENS_UNKNOWN_VOCAB
    return max(1, head_chunk_logits // vocab_size)


def plain_head_owner(model: nn.Module) -> nn.Module | None:
    """The model itself (or, for a PEFT model, its base model) when its architecture is in
    `PLAIN_HEAD_MODEL_TYPES` and it holds `lm_head` as a direct child; None otherwise. A module
    of the family nested in another model is not taken: the outer forward may change the logits.
    """
    get_base_model = getattr(model, "get_base_model", None)
    for module in (model, get_base_model() if callable(get_base_model) else None):
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type in PLAIN_HEAD_MODEL_TYPES and "lm_head" in module._modules:
            return module
    return None


@contextmanager
def hidden_states_as_logits(owner: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the model's forward returns its final hidden states as its "logits";
    yields the head (to apply by hand). The head is put back even when the forward fails."""
    head = owner._modules["lm_head"]
    assert head is not None, "plain_head_owner only returns modules with a head"
    owner._modules["lm_head"] = _HiddenStates()
    try:
        yield head
    finally:
        owner._modules["lm_head"] = head


class _HiddenStates(nn.Module):
    """The stand-in head: the hidden states themselves, as a tensor of their own. The model
    hands its head a view (a slice of the last hidden state); FSDP2 warns when a wrapped module
    returns a view, since an in-place op on one would skip its backward hook."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.clone() if hidden._is_view() else hidden


@dataclass(frozen=True, kw_only=True)
class HeadLoss:
    """What `head_loss` computed: the batch's weighted-mean loss (a detached float32 scalar) and,
    when asked for, the label log-probs [B, T] at the kept positions (0 elsewhere)."""

    loss: torch.Tensor
    logprobs_BT: torch.Tensor | None


def head_loss(
    hidden_BTH: torch.Tensor,
    head: nn.Module,
    batch: Batch,
    loss_fn: LossFn,
    keep_BT: torch.Tensor,
    *,
    chunk_tokens: int,
    autocast: Callable[[], AbstractContextManager[object]],
    backward: Callable[[torch.Tensor], None] | None = None,
    want_logprobs: bool = False,
) -> HeadLoss:
    """The loss of `batch` from the hidden states at the positions `keep_BT` (bool [B, T], which
    must hold every position of non-zero token weight), a chunk at a time.

    `backward(share)`, when given, backpropagates one chunk's share of the loss (the caller
    scales it); the decoder's backward then runs from the kept states' gradient. Without it
    nothing keeps a graph. `autocast()` wraps each chunk's head and loss.
    """
    assert chunk_tokens > 0 and bool(keep_BT.any()), "at least one kept position"
    rows_N, cols_N = keep_BT.nonzero(as_tuple=True)
    kept = _positions(batch, rows_N, cols_N, tuple(keep_BT.shape))
    hidden_NH = hidden_BTH[rows_N, cols_N]
    total_weight = token_weights(kept).sum().clamp(min=torch.finfo(torch.float32).tiny)
    leaf_NH = hidden_NH.detach().requires_grad_(backward is not None)
    loss = torch.zeros((), dtype=torch.float32, device=hidden_BTH.device)
    pieces: list[torch.Tensor] = []
    for start in range(0, leaf_NH.shape[0], chunk_tokens):
        chunk = _chunk(kept, start, start + chunk_tokens)
        with torch.set_grad_enabled(backward is not None), autocast():
            logits_1CV = apply_temperature(head(leaf_NH[None, start : start + chunk_tokens]), batch)
            share = loss_fn(logits_1CV, chunk) * (token_weights(chunk).sum() / total_weight)
        if backward is not None:
            backward(share)
        loss += share.detach().float()
        if want_logprobs:
            pieces.append(label_logprobs(logits_1CV.detach(), chunk["labels"])[0])
    if backward is not None and hidden_NH.requires_grad:  # not when only the head trains
        grad_NH = leaf_NH.grad if leaf_NH.grad is not None else torch.zeros_like(leaf_NH)
        hidden_NH.backward(grad_NH)
    logprobs_BT = None
    if want_logprobs:
        logprobs_BT = torch.zeros(keep_BT.shape, dtype=torch.float32, device=keep_BT.device)
        logprobs_BT[rows_N, cols_N] = torch.cat(pieces)
    return HeadLoss(loss=loss, logprobs_BT=logprobs_BT)


def _positions(
    batch: Batch, rows_N: torch.Tensor, cols_N: torch.Tensor, shape_BT: tuple[int, ...]
) -> dict[str, object]:
    """The batch at the kept positions, as one row [1, N]; entries of another shape (the
    temperature) as they are."""
    return {
        key: value[rows_N, cols_N][None]
        if isinstance(value, torch.Tensor) and tuple(value.shape) == shape_BT
        else value
        for key, value in batch.items()
    }


def _chunk(kept: dict[str, object], start: int, stop: int) -> dict[str, object]:
    """Positions [start, stop) of a one-row batch from `_positions`."""
    length = kept["labels"].shape[1]  # type: ignore[union-attr]
    return {
        key: value[:, start:stop]
        if isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[1] == length
        else value
        for key, value in kept.items()
    }
