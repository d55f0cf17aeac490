"""HFRolloutEngine: determinism, snapshot semantics, exact log-probs, EOS/stop handling, errors.

References are independent of the engine's sampling code: full (uncached, unpadded) forwards of
the model on prompt + completion, with temperature, top-k and top-p applied by a plain Python
loop. A char-level tokenizer is built in memory; nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path

import pytest
import torch
import trio
from conftest import tiny_llama_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from rollouts.core.weights import WeightUpdate
from rollouts.inference import Completion, HFRolloutEngine, RolloutEngine, SamplingParams
from rollouts.training import BackendFailedError, PyTorchTrainingBackend
from rollouts.training.backends import create_cross_entropy_loss

PAD_ID, EOS_ID = 0, 1


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


TOKENIZER = build_tokenizer()


def build_model(seed: int = 1234) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_llama_config(
        vocab_size=len(TOKENIZER), eos_token_id=EOS_ID, bos_token_id=EOS_ID, pad_token_id=PAD_ID
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return build_model()


def thread_engine(model: torch.nn.Module, **kwargs: object) -> HFRolloutEngine:
    return HFRolloutEngine(model, TOKENIZER, mode="thread", **kwargs)


PROMPTS = [TOKENIZER.encode(text) for text in ("2+3=", "hello world", "a")]


def full_logits(model: torch.nn.Module, completion: Completion) -> torch.Tensor:
    """Logits [N, V] predicting each generated token, from one uncached, unpadded forward."""
    ids = torch.tensor([completion.prompt_token_ids + completion.token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    start = len(completion.prompt_token_ids) - 1
    return logits[start : start + len(completion.token_ids)].double()


def hand_logprob(logits_V: torch.Tensor, token: int, params: SamplingParams) -> float:
    """log q(token) with q built by hand: temperature, top-k, top-p, renormalise."""
    scaled = [x / params.temperature for x in logits_V.tolist()]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = (
        order
        if params.top_k == -1
        else [i for i in order if scaled[i] >= scaled[order[params.top_k - 1]]]
    )
    normaliser = sum(math.exp(scaled[i]) for i in kept)
    nucleus, mass = [], 0.0
    for i in kept:
        if mass >= params.top_p:
            break
        nucleus.append(i)
        mass += math.exp(scaled[i]) / normaliser
    if token not in nucleus:
        return -math.inf
    return scaled[token] - math.log(sum(math.exp(scaled[i]) for i in nucleus))


def test_is_a_rollout_engine(model: LlamaForCausalLM) -> None:
    engine = thread_engine(model)
    assert isinstance(engine, RolloutEngine)
    engine.close()


def test_same_seed_same_samples_and_another_seed_differs(model: LlamaForCausalLM) -> None:
    params = SamplingParams(max_tokens=12, seed=7, top_p=0.95)
    with thread_engine(model) as first, thread_engine(model, batch_size_max=4) as second:
        a = first.sample(PROMPTS, 3, params).wait()
        b = first.sample(PROMPTS, 3, params).wait()
        c = second.sample(PROMPTS, 3, params).wait()
        other = first.sample(PROMPTS, 3, SamplingParams(max_tokens=12, seed=8, top_p=0.95)).wait()
        unseeded = [first.sample(PROMPTS, 3, SamplingParams(max_tokens=12)).wait() for _ in "xy"]
    assert [len(group) for group in a] == [3, 3, 3]
    assert a == b  # same engine, same call
    # Another engine that splits the 9 rows into chunks of 4: the same tokens (log-probs may differ
    # in the last bits with the padding and batch shape).
    assert [[x.token_ids for x in g] for g in a] == [[x.token_ids for x in g] for g in c]
    assert [[x.token_ids for x in g] for g in a] != [[x.token_ids for x in g] for g in other]
    assert unseeded[0] != unseeded[1]
    # The samples of one prompt differ from each other (each row draws its own tokens).
    assert len({tuple(x.token_ids) for x in a[1]}) == 3
    assert all(x.prompt_token_ids == PROMPTS[i] for i, g in enumerate(a) for x in g)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=10, seed=1),
        SamplingParams(max_tokens=10, seed=2, temperature=0.7, top_k=12, top_p=0.8),
        SamplingParams(max_tokens=10, seed=3, temperature=1.3, top_p=0.5),
    ],
    ids=["plain", "temp-topk-topp", "hot-topp"],
)
def test_logprobs_are_those_of_the_distribution_sampled_from(
    model: LlamaForCausalLM, params: SamplingParams
) -> None:
    with thread_engine(model) as engine:
        groups = engine.sample(PROMPTS, 2, params).wait()
    checked = 0
    for completion in (c for group in groups for c in group):
        assert len(completion.logprobs) == len(completion.token_ids)
        logits = full_logits(model, completion)
        for step, (token, logprob) in enumerate(
            zip(completion.token_ids, completion.logprobs, strict=True)
        ):
            expected = hand_logprob(logits[step], token, params)
            assert math.isfinite(expected), f"token {token} sampled outside the support"
            assert logprob == pytest.approx(expected, abs=2e-4)
            checked += 1
    assert checked >= 30
    if params.top_p < 1 or params.top_k != -1:
        # The processed distribution is not the raw softmax: the log-probs really differ.
        completion = groups[0][0]
        raw = torch.log_softmax(full_logits(model, completion), -1)
        raw_picked = raw.gather(-1, torch.tensor(completion.token_ids).unsqueeze(-1)).squeeze(-1)
        assert (
            raw_picked - torch.tensor(completion.logprobs, dtype=torch.float64)
        ).abs().max() > 1e-2


def test_greedy_is_the_argmax_with_logprob_zero(model: LlamaForCausalLM) -> None:
    with thread_engine(model) as engine:
        greedy = engine.sample(PROMPTS, 2, SamplingParams(max_tokens=8, temperature=0)).wait()
        top1 = engine.sample(PROMPTS, 1, SamplingParams(max_tokens=8, top_k=1, seed=5)).wait()
    for group, top1_group in zip(greedy, top1, strict=True):
        first, second = group
        assert first.token_ids == second.token_ids == top1_group[0].token_ids
        assert first.logprobs == [0.0] * len(first.token_ids)
        assert top1_group[0].logprobs == pytest.approx([0.0] * len(first.token_ids), abs=1e-6)
        argmax = full_logits(model, first).argmax(-1).tolist()
        assert first.token_ids == argmax


def test_eos_ends_a_completion_with_stop_and_is_included(model: LlamaForCausalLM) -> None:
    params = SamplingParams(max_tokens=12, temperature=0)
    with thread_engine(model) as engine:
        original = engine.sample([PROMPTS[1]], 1, params).wait()[0][0]
    assert original.finish_reason == "length" and len(original.token_ids) == 12
    assert EOS_ID not in original.token_ids
    greedy = original.token_ids
    cut = next(j for j in range(2, 12) if greedy[j] not in greedy[:j])
    # Swap the output rows of EOS and greedy[cut]: the swapped model is the original with the two
    # ids exchanged, so its greedy run equals the original up to `cut`, where it emits EOS.
    swapped = build_model()
    with torch.no_grad():
        rows = swapped.lm_head.weight[[EOS_ID, greedy[cut]]].clone()
        swapped.lm_head.weight[[greedy[cut], EOS_ID]] = rows
    with thread_engine(swapped) as engine:
        ended = engine.sample([PROMPTS[1]], 1, params).wait()[0][0]
    assert ended.token_ids == [*greedy[:cut], EOS_ID]
    assert ended.finish_reason == "stop"
    assert ended.text == TOKENIZER.decode(greedy[:cut])  # EOS itself is not in the text
    assert ended.logprobs == [0.0] * (cut + 1)


def test_stop_strings_cut_the_text_and_keep_the_tokens(model: LlamaForCausalLM) -> None:
    params = SamplingParams(max_tokens=24, seed=11)
    with thread_engine(model) as engine:
        original = engine.sample([PROMPTS[0]], 1, params).wait()[0][0]
        assert original.finish_reason == "length" and original.text == TOKENIZER.decode(
            original.token_ids
        )
        stop = original.text[6:8]
        stopped_params = SamplingParams(max_tokens=24, seed=11, stop=("never there", stop))
        stopped = engine.sample([PROMPTS[0]], 1, stopped_params).wait()[0][0]
    # The same seed draws the same tokens until the stop string is complete.
    n = next(
        n
        for n in range(1, len(original.token_ids) + 1)
        if stop in TOKENIZER.decode(original.token_ids[:n])
    )
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == original.token_ids[:n]
    assert stopped.logprobs == original.logprobs[:n]
    full_text = TOKENIZER.decode(original.token_ids[:n])
    assert stopped.text == full_text[: full_text.find(stop)]
    assert stop not in stopped.text


def test_engine_is_a_snapshot_not_a_view_of_the_trainer(tmp_path: Path) -> None:
    trained = build_model()
    optimizer = torch.optim.SGD(trained.parameters(), lr=5.0)
    backend = PyTorchTrainingBackend(
        trained, optimizer, create_cross_entropy_loss(), tmp_path, "cpu", max_grad_norm=None
    )
    params = SamplingParams(max_tokens=10, seed=3)
    with backend, thread_engine(build_model(seed=99), weight_version=0) as engine:
        weights = backend.get_weights().wait()
        engine.load_weights(weights, 1)
        assert engine.weight_version == 1
        before = engine.sample(PROMPTS, 2, params).wait()
        ids = torch.tensor([PROMPTS[1]])
        backend.forward_backward({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        backend.optim_step().wait()
        after_training = engine.sample(PROMPTS, 2, params).wait()
        for tensor in weights.values():
            tensor.add_(1.0)  # mutate the loaded dict in place
        after_mutation = engine.sample(PROMPTS, 2, params).wait()
        # The control: loading the trained weights does change the samples.
        engine.load_weights(backend.get_weights().wait(), 2)
        reloaded = engine.sample(PROMPTS, 2, params).wait()
    assert before == after_training == after_mutation
    assert all(c.weight_version == 1 for group in before for c in group)
    assert all(c.weight_version == 2 for group in reloaded for c in group)
    assert [[c.logprobs for c in g] for g in reloaded] != [[c.logprobs for c in g] for g in before]


def test_engine_does_not_alias_the_model_it_was_given() -> None:
    source = build_model()
    params = SamplingParams(max_tokens=8, seed=4)
    with thread_engine(source) as engine:
        before = engine.sample(PROMPTS, 1, params).wait()
        with torch.no_grad():
            for parameter in source.parameters():
                parameter.mul_(3.0)
        assert engine.sample(PROMPTS, 1, params).wait() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"max_tokens": 2.5}, "max_tokens must be an int"),
        ({"max_tokens": 4, "temperature": -0.1}, "temperature must be >= 0"),
        ({"max_tokens": 4, "top_k": 0}, r"top_k must be -1 \(off\) or >= 1, got 0"),
        ({"max_tokens": 4, "top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"max_tokens": 4, "top_p": 1.5}, "top_p must be in"),
        ({"max_tokens": 4, "stop": "\n"}, "stop must be a tuple of strings, got the string"),
        ({"max_tokens": 4, "stop": ("",)}, "stop must hold non-empty strings"),
        ({"max_tokens": 4, "seed": -1}, "seed must be None or an int >= 0, got -1"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_calls_raise_at_once(model: LlamaForCausalLM) -> None:
    assert SamplingParams(max_tokens=3, stop=["x"]).stop == ("x",)
    params = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="mode='gpu'"):
        HFRolloutEngine(model, TOKENIZER, mode="gpu")
    with thread_engine(model) as engine:
        with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
            engine.sample([[3], []], 1, params)
        with pytest.raises(ValueError, match=r"prompts\[0\] holds token ids \[500\]"):
            engine.sample([[500]], 1, params)
        with pytest.raises(ValueError, match="num_samples must be an int >= 1, got 0"):
            engine.sample([[3]], 0, params)
        with pytest.raises(ValueError, match="max_position_embeddings=256"):
            engine.sample([[3] * 250], 1, SamplingParams(max_tokens=10))
        weights = dict(model.state_dict())
        del weights["lm_head.weight"]
        with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
            engine.load_weights(weights, 1)
        weights["lm_head.weight"] = torch.zeros(3, 3)
        with pytest.raises(ValueError, match=r"lm_head.weight has shape \(3, 3\)"):
            engine.load_weights(weights, 1)
        assert engine.weight_version == 0  # nothing was loaded
        assert engine.sample([[3]], 1, params).wait()[0][0].weight_version == 0


@pytest.mark.asyncio
async def test_sampling_can_be_awaited_under_asyncio(model: LlamaForCausalLM) -> None:
    params = SamplingParams(max_tokens=6, seed=0)
    with thread_engine(model) as engine:
        results = await asyncio.gather(engine.sample(PROMPTS, 1, params), asyncio.sleep(0))
        assert results[0] == engine.sample(PROMPTS, 1, params).wait()


@pytest.mark.trio
async def test_sampling_can_be_awaited_under_trio(model: LlamaForCausalLM) -> None:
    params = SamplingParams(max_tokens=6, seed=0)
    with thread_engine(model) as engine:
        completions = await engine.sample(PROMPTS, 1, params)
        await trio.sleep(0)
        assert completions == engine.sample(PROMPTS, 1, params).wait()


def test_process_engine_matches_the_thread_engine_and_shuts_down(model: LlamaForCausalLM) -> None:
    params = SamplingParams(max_tokens=10, seed=5, top_k=20)
    with thread_engine(model) as reference:
        expected = reference.sample(PROMPTS, 2, params).wait()
        reference.load_weights(build_model(seed=5).state_dict(), 4)
        expected_v4 = reference.sample(PROMPTS, 1, params).wait()
    engine = HFRolloutEngine(model, TOKENIZER, mode="process")
    try:
        assert engine.sample(PROMPTS, 2, params).wait(timeout=120) == expected
        weights = build_model(seed=5).state_dict()
        engine.load_weights(weights, 4)
        for tensor in weights.values():
            tensor.zero_()  # after the call: must not reach the child
        assert engine.sample(PROMPTS, 1, params).wait(timeout=60) == expected_v4
        process = engine._child._process
        assert process.is_alive()
    finally:
        engine.close()
    assert not process.is_alive()


def test_a_failure_in_a_healthy_engine_process_is_a_refusal_and_nothing_hangs(
    model: LlamaForCausalLM,
) -> None:
    engine = HFRolloutEngine(model, TOKENIZER, mode="process")
    try:
        broken = {name: torch.full_like(t, float("nan")) for name, t in model.state_dict().items()}
        engine.load_weights(broken, 1)
        failing = engine.sample(PROMPTS, 1, SamplingParams(max_tokens=4))
        queued = engine.sample(PROMPTS, 1, SamplingParams(max_tokens=4))
        with pytest.raises(FloatingPointError, match="NaN logits") as raised:
            failing.wait(timeout=120)
        assert any("engine process" in note for note in raised.value.__notes__)
        assert any("refused" in note for note in raised.value.__notes__)
        # Sampling changes nothing, and the child is still serving: the next call runs (and
        # meets the same NaN weights), and loading good weights makes sampling work again.
        with pytest.raises(FloatingPointError, match="NaN logits"):
            queued.wait(timeout=60)
        engine.load_weights(model.state_dict(), 2)
        recovered = engine.sample(PROMPTS, 1, SamplingParams(max_tokens=4, seed=0))
        assert recovered.wait(timeout=60)[0][0].weight_version == 2
        process = engine._child._process
        assert process.is_alive()
    finally:
        engine.close()
    assert not process.is_alive()


def test_load_weights_takes_a_weight_update_and_refuses_another_kind(
    model: LlamaForCausalLM,
) -> None:
    params = SamplingParams(max_tokens=8, seed=2)
    other = build_model(seed=5).state_dict()
    with thread_engine(model) as from_dict, thread_engine(model) as from_update:
        from_dict.load_weights(other, 3)
        from_update.load_weights(WeightUpdate(tensors=other), 3)
        assert from_dict.sample(PROMPTS, 1, params).wait() == (
            from_update.sample(PROMPTS, 1, params).wait()
        )
        unknown = WeightUpdate(tensors=other)
        # A kind WeightUpdate does not construct (an in-place GPU transfer, say), forced in.
        object.__setattr__(unknown, "kind", "nccl")
        with pytest.raises(ValueError, match=r"kind='nccl'.*only kinds \('full', 'adapter'\)"):
            from_update.load_weights(unknown, 4)
        a, b = torch.zeros(2, 5), torch.zeros(7, 2)  # a [7, 5] update for a weight that is not
        wrong = WeightUpdate(
            tensors={"lm_head.weight::lora_A": a, "lm_head.weight::lora_B": b},
            kind="adapter",
            scales={"lm_head.weight": 1.0},
        )
        with pytest.raises(ValueError, match=r"adapter of 'lm_head.weight' makes a \(7, 5\)"):
            from_update.load_weights(wrong, 4)
        with pytest.raises(TypeError, match="WeightUpdate or a state dict"):
            from_update.load_weights([("x", torch.zeros(1))], 4)  # type: ignore[arg-type]
        assert from_update.weight_version == 3


def test_a_load_that_fails_midway_stops_the_stream_until_a_load_succeeds(
    model: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = SamplingParams(max_tokens=4, seed=0)
    queued_behind = threading.Event()
    with thread_engine(model) as engine:
        core = engine._core

        def copy_half_then_fail(state_dict: dict[str, torch.Tensor], version: int) -> None:
            half = list(state_dict)[: len(state_dict) // 2]
            core.model.load_state_dict({name: state_dict[name] for name in half}, strict=False)
            queued_behind.wait(timeout=30)
            raise RuntimeError("out of memory halfway through the copy")

        monkeypatch.setattr(core, "load_weights", copy_half_then_fail)
        failed = engine.load_weights(model.state_dict(), 1)
        queued = engine.sample(PROMPTS, 1, params)
        queued_behind.set()
        with pytest.raises(RuntimeError, match="halfway"):
            failed.wait(timeout=30)
        with pytest.raises(BackendFailedError, match=r"load_weights#\d+ raised RuntimeError"):
            queued.wait(timeout=30)
        with pytest.raises(BackendFailedError, match="weights half-changed"):
            engine.sample(PROMPTS, 1, params)
        monkeypatch.undo()
        engine.load_weights(model.state_dict(), 2).wait(timeout=30)  # a full load recovers
        assert engine.sample(PROMPTS, 1, params).wait(timeout=30)[0][0].weight_version == 2
