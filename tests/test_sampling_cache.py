"""The sampler's KV cache: transformers' current Cache API, the same tokens as `model.generate`.

The sampler passes a `DynamicCache` under the argument name the model's forward declares. These
tests check that sampling raises no deprecation (neither a Python warning nor a transformers log
line), that greedy decoding of a left-padded batch equals `model.generate(do_sample=False)` token
for token on three architectures (Llama; Qwen2; Gemma2, whose sliding-window layers get their own
cache kind), and how the sampler meets a forward that names the cache the older way or drops it.
Models are tiny and built from configs; nothing is downloaded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers import (
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.inference import HFRolloutEngine, SamplingParams
from rollouts.inference._sampling import generate

TOKENIZER = build_char_tokenizer()
PROMPT_TEXTS = ("12+34=", "hello there, world", "a")  # different lengths: the batch is left-padded
PROMPTS = [TOKENIZER.encode(text, add_special_tokens=False) for text in PROMPT_TEXTS]
MAX_TOKENS = 12

_TINY = dict(
    vocab_size=len(TOKENIZER),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=TOKENIZER.pad_token_id,
    bos_token_id=TOKENIZER.bos_token_id,
    eos_token_id=TOKENIZER.eos_token_id,
)


def tiny_model(architecture: str) -> PreTrainedModel:
    torch.manual_seed(0)
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**_TINY)).eval()
    if architecture == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**_TINY)).eval()
    # A window shorter than the prompts: layer 0 slides, layer 1 attends to everything.
    config = Gemma2Config(**_TINY, head_dim=16, sliding_window=4)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    return Gemma2ForCausalLM(config).eval()


@contextmanager
def transformers_notices() -> Iterator[list[str]]:
    """Every Python warning and every transformers log record (WARNING and up) inside the block.

    transformers logs its deprecations with `warning_once`, remembered per process: the memory is
    cleared on entry, so a message an earlier test already logged is logged (and seen) again.
    """
    notices: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notices.append(record.getMessage())

    handler = Collect(logging.WARNING)
    # The library's root logger does not propagate, so the handler goes on it, not on the root
    # (and its stream handler keeps the stderr of import time, which `capfd` does not see).
    library_logger = logging.getLogger("transformers")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.warning_once.cache_clear()
    library_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notices
        notices.extend(str(warning.message) for warning in caught)
    finally:
        library_logger.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)


def test_sampling_raises_no_deprecation_warning_or_log_line() -> None:
    model = tiny_model("llama")
    params = SamplingParams(max_tokens=6, seed=0, top_p=0.9)
    with (
        transformers_notices() as notices,
        HFRolloutEngine(model, TOKENIZER, mode="thread") as engine,
    ):
        engine.sample(PROMPTS, 2, params).wait()
    assert notices == []
    # The control: the capture does see the deprecation when the cache goes by its old name.
    ids = torch.tensor([PROMPTS[0]])
    with transformers_notices() as notices, torch.no_grad():
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    assert any("`past_key_values` is deprecated" in notice for notice in notices)
    assert any("Use `cache` instead" in notice for notice in notices)


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), length), TOKENIZER.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    return input_ids, mask


def up_to_eos(tokens: list[int]) -> list[int]:
    """The tokens through the first EOS: `generate` pads the rows that finished, we stop them."""
    eos = TOKENIZER.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gemma2"])
def test_greedy_matches_model_generate_on_a_left_padded_batch(architecture: str) -> None:
    model = tiny_model(architecture)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    with HFRolloutEngine(model, TOKENIZER, mode="thread") as engine:
        groups = engine.sample(PROMPTS, 1, params).wait()
    input_ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        reference = model.generate(
            input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            pad_token_id=TOKENIZER.pad_token_id,
            eos_token_id=TOKENIZER.eos_token_id,
        )
    expected = [up_to_eos(row) for row in reference[:, input_ids.shape[1] :].tolist()]
    assert [group[0].token_ids for group in groups] == expected
    # Not vacuous: the rows are long enough to pass the sliding window, and they differ.
    assert all(len(tokens) == MAX_TOKENS for tokens in expected)
    assert len({tuple(tokens) for tokens in expected}) == len(PROMPTS)


class OldCacheNameLlama(LlamaForCausalLM):
    """A Llama whose forward takes and returns the KV cache as `past_key_values`, the name of the
    transformers releases before `cache` (and of remote-code models written for them)."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
    ) -> SimpleNamespace:
        output = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            use_cache=use_cache,
        )
        return SimpleNamespace(logits=output.logits, past_key_values=output.cache)


class CacheDroppingWrapper(nn.Module):
    """A forward taking `**kwargs` that loses the cache and returns the logits alone."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs: Any) -> SimpleNamespace:
        kwargs.pop("cache")
        return SimpleNamespace(logits=self.inner(**kwargs).logits)


def sample_greedy(model: nn.Module) -> list[list[int]]:
    rows = generate(
        model,
        PROMPTS,
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        [0] * len(PROMPTS),
        decode=TOKENIZER.decode,
        eos_token_ids=frozenset({TOKENIZER.eos_token_id}),
        pad_token_id=TOKENIZER.pad_token_id,
        batch_size_max=len(PROMPTS),
    )
    return [row.token_ids for row in rows]


def test_a_forward_with_the_older_cache_name_gets_the_cache_under_that_name() -> None:
    model = tiny_model("llama")
    old_name = OldCacheNameLlama(model.config).eval()
    old_name.load_state_dict(model.state_dict())
    with transformers_notices() as notices:
        assert sample_greedy(old_name) == sample_greedy(model)
    assert notices == []


def test_a_forward_that_returns_no_cache_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"CacheDroppingWrapper\.forward returned no `cache`"):
        sample_greedy(CacheDroppingWrapper(tiny_model("llama")))
