"""The sampling loop behind `HFRolloutEngine`: batched, left-padded, over the model's KV cache.

We run our own loop over the model's KV cache rather than `model.generate` so that the log-prob
we record is computed from exactly the distribution we draw from (`processed_logprobs`), and so
that the randomness is ours: each row (one sample of one prompt) draws its uniforms from its own
`torch.Generator`, seeded from the call's seed and the row's index, and picks its token by
inverse CDF. A row's samples therefore do not depend on how rows are split into batches or on the
other rows' draws (up to float rounding of the logits, which batch shape can change in the last
bits).

The cache is a transformers `DynamicCache` built from the model's config, as `model.generate`
builds its default one (so sliding-window and hybrid models get their per-layer kinds), passed to
every forward under the argument name the model's forward declares (`_cache_keyword`).

Synchronous and thread-agnostic: the engine runs it on its worker thread or in its own process.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Cache, DynamicCache

from rollouts.inference.protocol import SamplingParams

__all__ = ["GeneratedRow", "generate", "processed_logprobs"]


def processed_logprobs(logits_NV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probs [N, V] (float32) of the distribution sampled from; -inf outside its support.

    Order as in Hugging Face's warpers: temperature, then top-k (ties at the k-th value are all
    kept), then top-p (the smallest prefix of the sorted tokens whose mass reaches top_p; the most
    likely token is always kept), then renormalise.
    """
    logits_NV = logits_NV.float()
    if params.temperature == 0:
        greedy_N1 = logits_NV.argmax(dim=-1, keepdim=True)
        point_mass_NV = torch.full_like(logits_NV, float("-inf"))
        return point_mass_NV.scatter(-1, greedy_N1, 0.0)
    scaled_NV = logits_NV / params.temperature
    vocab_size = scaled_NV.shape[-1]
    if 0 < params.top_k < vocab_size:
        kth_value_N1 = torch.topk(scaled_NV, params.top_k, dim=-1).values[:, -1:]
        scaled_NV = scaled_NV.masked_fill(scaled_NV < kth_value_N1, float("-inf"))
    if params.top_p < 1.0:
        sorted_NV, order_NV = torch.sort(scaled_NV, dim=-1, descending=True)
        sorted_probs_NV = torch.softmax(sorted_NV, dim=-1)
        mass_before_NV = sorted_probs_NV.cumsum(dim=-1) - sorted_probs_NV
        drop_sorted_NV = mass_before_NV >= params.top_p
        drop_sorted_NV[:, 0] = False
        drop_NV = torch.zeros_like(drop_sorted_NV).scatter(-1, order_NV, drop_sorted_NV)
        scaled_NV = scaled_NV.masked_fill(drop_NV, float("-inf"))
    return torch.log_softmax(scaled_NV, dim=-1)


@dataclass
class GeneratedRow:
    """One row's output: tokens, their log-probs under the sampled distribution, the outcome."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    text: str = ""


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    row_seeds: Sequence[int],
    *,
    decode: Callable[[list[int]], str],
    eos_token_ids: frozenset[int],
    pad_token_id: int,
    batch_size_max: int,
) -> list[GeneratedRow]:
    """Sample one completion per prompt row, `batch_size_max` rows at a time, in order."""
    assert batch_size_max >= 1, f"batch_size_max must be >= 1, got {batch_size_max}"
    assert len(row_seeds) == len(prompts), "one seed per row"
    generators = [torch.Generator().manual_seed(seed) for seed in row_seeds]
    forward = _CachedForward(model)
    rows: list[GeneratedRow] = []
    for start in range(0, len(prompts), batch_size_max):
        chunk = prompts[start : start + batch_size_max]
        chunk_generators = generators[start : start + batch_size_max]
        rows.extend(
            _generate_chunk(
                forward, chunk, params, chunk_generators, decode, eos_token_ids, pad_token_id
            )
        )
    for row in rows:
        if row.finish_reason == "length":  # "stop" rows set their text when they stopped
            row.text = decode(row.token_ids)
    return rows


def _cache_keyword(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: `cache`, or `past_key_values` where older.

    transformers renamed the argument (and the output field) from `past_key_values` to `cache`
    within 5.x; the old name warns and is to be removed in 5.40. The project allows 5.x releases
    from before the rename, and remote-code models may keep the old name, so the name is read from
    the forward's signature, in this one place. A forward that declares neither (a wrapper taking
    `**kwargs`) gets the current name, which it passes through.
    """
    parameters = inspect.signature(model.forward).parameters
    if "cache" not in parameters and "past_key_values" in parameters:
        return "past_key_values"
    return "cache"


class _CachedForward:
    """The model's forward over one KV cache, which it fills in place; `start` opens a new one."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.keyword = _cache_keyword(model)
        config = getattr(model, "config", None)
        # As `model.generate` does: with the (decoder's) config, the cache gives sliding-window
        # layers a window-sized cache, and hybrid models their per-layer kinds.
        self._config = None if config is None else config.get_text_config(decoder=True)
        self._cache: Cache | None = None
        # Only the last position's logits are read: a prefill that computed all of them would
        # spend [N, L, V] of head work and memory on prompt positions.
        parameters = inspect.signature(model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    def start(self) -> None:
        self._cache = DynamicCache(config=self._config)

    def __call__(self, **inputs: torch.Tensor) -> Any:
        assert self._cache is not None, "start() opens a cache before the first forward"
        output = self.model(
            **inputs, **{self.keyword: self._cache}, **self._last_logits_only, use_cache=True
        )
        returned = getattr(output, self.keyword, None)
        if returned is None:
            # A forward that dropped the cache (taken by `**kwargs` and ignored) would decode each
            # token without its context and sample garbage without an error.
            raise TypeError(
                f"{type(self.model).__name__}.forward returned no `{self.keyword}`: it does not "
                f"take the KV cache as `{self.keyword}=`"
            )
        self._cache = returned
        return output


def _left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(prompt) for prompt in prompts)
    input_ids_NL = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask_NL = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            input_ids_NL[row, length - len(prompt) :] = torch.tensor(list(prompt))
            mask_NL[row, length - len(prompt) :] = 1
    return input_ids_NL.to(device), mask_NL.to(device)


def _generate_chunk(
    forward: _CachedForward,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    generators: list[torch.Generator],
    decode: Callable[[list[int]], str],
    eos_token_ids: frozenset[int],
    pad_token_id: int,
) -> list[GeneratedRow]:
    device = next(forward.model.parameters()).device
    input_ids_NL, mask_NL = _left_pad(prompts, pad_token_id, device)
    # Left padding: positions count real tokens only, so a padded row sees the same positions as
    # it would alone.
    positions_NL = (mask_NL.cumsum(dim=-1) - 1).clamp(min=0)
    rows = [GeneratedRow() for _ in prompts]
    active = [True] * len(prompts)
    forward.start()
    output = forward(input_ids=input_ids_NL, attention_mask=mask_NL, position_ids=positions_NL)
    for step in range(params.max_tokens):
        logits_NV = output.logits[:, -1, :]
        if bool(torch.isnan(logits_NV).any()):
            # NaN would sample garbage silently (and record NaN log-probs); broken weights are a
            # caller's problem to see at once.
            raise FloatingPointError(
                f"the model produced NaN logits at generation step {step}; check the weights "
                "loaded into the engine"
            )
        logprobs_NV = processed_logprobs(logits_NV, params)
        if params.temperature == 0:
            tokens_N = logprobs_NV.argmax(dim=-1)
        else:
            tokens_N = _draw(logprobs_NV, generators)
        token_logprobs_N = logprobs_NV.gather(-1, tokens_N.unsqueeze(-1)).squeeze(-1)
        tokens, token_logprobs = tokens_N.tolist(), token_logprobs_N.tolist()
        for index, row in enumerate(rows):
            if active[index]:
                active[index] = _append(
                    row, tokens[index], token_logprobs[index], params, decode, eos_token_ids
                )
        if not any(active):
            break
        # Finished rows keep decoding a pad token (their outputs are ignored): cheaper than
        # re-indexing the cache, and it keeps every row's arithmetic independent of the others.
        next_N1 = torch.tensor(
            [t if a else pad_token_id for t, a in zip(tokens, active, strict=True)], device=device
        ).unsqueeze(-1)
        mask_NL = torch.cat([mask_NL, torch.ones_like(mask_NL[:, :1])], dim=-1)
        positions_NL = positions_NL[:, -1:] + 1
        output = forward(input_ids=next_N1, attention_mask=mask_NL, position_ids=positions_NL)
    return rows


def _draw(logprobs_NV: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse CDF, with a uniform from each row's own generator."""
    uniforms_N = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    cdf_NV = logprobs_NV.double().exp().cumsum(dim=-1)
    targets_N1 = (uniforms_N.to(cdf_NV.device) * cdf_NV[:, -1]).unsqueeze(-1)
    # right=True: the first token whose cdf exceeds the target, so a zero-probability token (whose
    # cdf equals its predecessor's) is never picked.
    tokens_N = torch.searchsorted(cdf_NV, targets_N1, right=True).squeeze(-1)
    tokens_N = tokens_N.clamp(max=cdf_NV.shape[-1] - 1)
    outside_N = logprobs_NV.gather(-1, tokens_N.unsqueeze(-1)).squeeze(-1) == float("-inf")
    # Only reachable by rounding at the very top of the cdf: take the most likely token.
    return torch.where(outside_N, logprobs_NV.argmax(dim=-1), tokens_N)


def _append(
    row: GeneratedRow,
    token: int,
    logprob: float,
    params: SamplingParams,
    decode: Callable[[list[int]], str],
    eos_token_ids: frozenset[int],
) -> bool:
    """Record a sampled token; return False once the row has finished."""
    row.token_ids.append(token)
    row.logprobs.append(logprob)
    if token in eos_token_ids:
        row.finish_reason = "stop"
        row.text = decode(row.token_ids)
        return False
    if params.stop:
        text = decode(row.token_ids)
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            row.finish_reason, row.text = "stop", text[:cut]
            return False
    return True
