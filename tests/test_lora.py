"""LoRA on the single-device backend: equal to a plain PEFT training loop written here, exact
accumulation and resume, adapter-only checkpoints, merged and PEFT-format export, and adapter-only
weight sync into a rollout engine."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rollouts.inference import HFRolloutEngine, SamplingParams
from rollouts.training.backends import create_pytorch_backend
from rollouts.training.backends.lora import apply_lora, merged_state_dict

VOCAB, RANK, ALPHA, LR = 40, 4, 8.0, 2e-2
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=32, tie_word_embeddings=False)  # fmt: skip
    directory = tmp_path_factory.mktemp("lora") / "base"
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def batches(count: int, rows: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def lora_backend(model_dir: Path, checkpoints: Path, **options):
    return create_pytorch_backend(
        model_dir, checkpoints, device_type="cpu", learning_rate=LR, lora_rank=RANK,
        lora_alpha=ALPHA, num_threads=1, **options,
    )  # fmt: skip


def plain_peft_loop(model_dir: Path, data: list[dict]) -> tuple[list[float], dict]:
    """The reference: PEFT's own LoRA model, torch's AdamW over its trainable parameters,
    clipping at 1.0, mean cross-entropy; nothing of rollouts but the data."""
    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)  # the factories draw the adapters' A from lora_init_seed=0
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LINEARS)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  fused=True)  # fmt: skip
    losses = []
    for batch in data:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, trained


def run_steps(backend, data: list[dict]) -> list[float]:
    losses = []
    for batch in data:
        losses.append(backend.forward_backward(batch).wait(60)["loss"])
        backend.optim_step().wait(60)
    return losses


def adapters(backend) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backend.model.named_parameters() if p.requires_grad}


def test_lora_backend_equals_a_plain_peft_loop(model_dir, tmp_path) -> None:
    data = batches(4)
    expected_losses, expected = plain_peft_loop(model_dir, data)
    with lora_backend(model_dir, tmp_path) as backend:
        base_before = {
            n: p.clone() for n, p in backend.model.named_parameters() if "lora_" not in n
        }
        losses = run_steps(backend, data)
        trained = adapters(backend)
        in_optimizer = sum(len(group["params"]) for group in backend.optimizer.param_groups)
        base_after = {n: p for n, p in backend.model.named_parameters() if "lora_" not in n}
    assert losses == pytest.approx(expected_losses, rel=1e-6, abs=1e-6)
    assert set(trained) == set(expected) and len(trained) == 2 * 2 * len(LINEARS)
    for name in expected:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-5, atol=1e-6)
    assert in_optimizer == len(trained), "the optimizer holds the adapters only"
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before), "base frozen"


def test_accumulated_micro_batches_equal_one_batch(model_dir, tmp_path) -> None:
    (whole,) = batches(1, rows=4)
    halves = [{k: v[:2] for k, v in whole.items()}, {k: v[2:] for k, v in whole.items()}]
    with lora_backend(model_dir, tmp_path / "a") as one:
        run_steps(one, [whole])
        one_step = adapters(one)
    with lora_backend(model_dir, tmp_path / "b") as two:
        for half in halves:
            two.forward_backward(half)
        two.optim_step().wait(60)
        two_calls = adapters(two)
    for name, tensor in one_step.items():
        torch.testing.assert_close(two_calls[name], tensor, rtol=1e-5, atol=1e-6)


def test_resume_from_an_adapter_checkpoint_is_exact_and_small(model_dir, tmp_path) -> None:
    data = batches(4)
    with lora_backend(model_dir, tmp_path / "run", num_training_steps=4) as backend:
        run_steps(backend, data[:2])
        path = backend.save_checkpoint(2).wait(60)
        uninterrupted = run_steps(backend, data[2:])
        final = adapters(backend)
    with lora_backend(model_dir, tmp_path / "other", num_training_steps=4) as resumed:
        run_steps(resumed, data[:1])  # moved away from the checkpoint first
        resumed.load_checkpoint(path).wait(60)
        assert run_steps(resumed, data[2:]) == uninterrupted
        assert all(torch.equal(adapters(resumed)[n], t) for n, t in final.items())
    with create_pytorch_backend(model_dir, tmp_path / "full", device_type="cpu") as full:
        full_path = full.save_checkpoint(0).wait(60)
        with pytest.raises(ValueError, match=r"holds only the trained \(adapter\) weights"):
            full.load_checkpoint(path).wait(60)
    lora_bytes = (path / "model.safetensors").stat().st_size
    full_bytes = (full_path / "model.safetensors").stat().st_size
    import safetensors

    with safetensors.safe_open(str(path / "model.safetensors"), "pt") as saved:
        assert set(saved.keys()) == set(final), "the adapters and nothing else"
    adapter_floats = sum(t.numel() for t in final.values())  # rank x (in + out) per layer
    assert lora_bytes < 4 * adapter_floats + 8192 and lora_bytes * 3 < full_bytes


def _logits_by_forward(backend, ids: torch.Tensor) -> torch.Tensor:
    """Log-probs of every next token by the backend's own forward."""
    labels = torch.roll(ids, -1, dims=1)
    return backend.forward({"input_ids": ids, "labels": labels}).wait(60)["logprobs"]


def test_export_merged_and_as_a_peft_adapter(model_dir, tmp_path) -> None:
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(ids, -1, dims=1)
    with lora_backend(model_dir, tmp_path / "ckpt") as backend:
        run_steps(backend, batches(2))
        expected = _logits_by_forward(backend, ids)
        merged_dir = backend.export_hf(tmp_path / "merged").wait(60)
        adapter_dir = backend.export_hf(tmp_path / "adapter", adapter_only=True).wait(60)

    def logprobs(model) -> torch.Tensor:
        logits = model(input_ids=ids).logits.float()
        return torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert not any("lora" in n for n in merged.state_dict())
    torch.testing.assert_close(logprobs(merged).detach(), expected, rtol=0, atol=1e-5)
    assert (adapter_dir / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter_dir)
    torch.testing.assert_close(logprobs(with_adapter).detach(), expected, rtol=0, atol=1e-5)
    with (
        create_pytorch_backend(model_dir, tmp_path / "f", device_type="cpu") as full,
        pytest.raises(ValueError, match="has no adapter to write"),
    ):
        full.export_hf(tmp_path / "nope", adapter_only=True)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_the_engine_receives_only_adapters_and_samples_as_the_merged_model(
    model_dir, tmp_path, mode
) -> None:
    from rollouts.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=5)
    prompts = [[1, 2, 3], [4, 5]]
    with lora_backend(model_dir, tmp_path) as backend:
        updates = []
        for _ in range(2):  # two updates: the second must not build on the first's merge
            run_steps(backend, batches(1))
            updates.append(backend.sampler_weights().wait(60))
        full = backend.get_weights().wait(60)
        merged = merged_state_dict(backend.model)
    full_bytes = sum(t.numel() * t.element_size() for t in merged.values())
    assert updates[1].kind == "adapter" and updates[1].num_bytes * 5 < full_bytes
    with HFRolloutEngine(base, tokenizer, mode=mode) as engine:
        engine.load_weights(updates[0], 1)
        engine.load_weights(updates[1], 2).wait(60)
        by_adapter = engine.sample(prompts, 2, params).wait(60)
    reference = copy.deepcopy(base)
    reference.load_state_dict(merged)
    with HFRolloutEngine(reference, tokenizer, mode="thread") as engine:
        by_full = engine.sample(prompts, 2, params).wait(60)
    assert [[c.token_ids for c in g] for g in by_adapter] == [
        [c.token_ids for c in g] for g in by_full
    ]
    for got, want in zip(by_adapter, by_full, strict=True):
        for a, b in zip(got, want, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert any("lora_" in name for name in full), "get_weights is the whole PEFT state"


def test_lora_options_are_checked_before_loading(model_dir, tmp_path) -> None:
    for options, message in [
        ({"lora_rank": -1}, "Invalid lora_rank"),
        ({"lora_lm_head": True}, r"\['lora_lm_head'\] set, but lora_rank=0"),
        ({"lora_rank": 4, "lora_dropout": 1.5}, "Invalid lora_dropout"),
    ]:
        with pytest.raises(ValueError, match=message):
            create_pytorch_backend(tmp_path / "does-not-exist", tmp_path, **options)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(model, rank=2, target_modules=["no_such_layer"])


def test_a_tied_model_exports_merged_and_refuses_an_adapted_head(tmp_path) -> None:
    """SmolLM2-style tied embeddings: the merged export reloads (tied again) to the same logits."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    with lora_backend(tmp_path / "tied", tmp_path / "ckpt", lora_embeddings=True) as backend:
        run_steps(backend, batches(2))
        expected = _logits_by_forward(backend, ids)
        exported = backend.export_hf(tmp_path / "merged").wait(60)
        update = backend.sampler_weights().wait(60)
    merged = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    assert merged.config.tie_word_embeddings is False, "the merged embedding left the head"
    got = torch.log_softmax(merged(input_ids=ids).logits, -1)
    got = got.gather(-1, torch.roll(ids, -1, dims=1).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.detach(), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="shares its weight with the input embedding"):
        lora_backend(tmp_path / "tied", tmp_path / "x", lora_lm_head=True)
    with pytest.raises(ValueError, match="names the LM head 'lm_head'"):
        lora_backend(tmp_path / "tied", tmp_path / "y", lora_target_modules=("lm_head", "q_proj"))
    # An engine on the tied base, given the adapters, samples as the merged (untied) export.
    from rollouts.data.char_tokenizer import build_char_tokenizer

    tokenizer, params = build_char_tokenizer(), SamplingParams(max_tokens=5, seed=2)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", dtype=torch.float32)
    with HFRolloutEngine(base, tokenizer, mode="thread") as engine:
        engine.load_weights(update, 1).wait(60)
        by_adapter = engine.sample([[1, 2, 3]], 3, params).wait(60)
    with HFRolloutEngine(merged, tokenizer, mode="thread") as engine:
        by_export = engine.sample([[1, 2, 3]], 3, params).wait(60)
    for got, want in zip(by_adapter[0], by_export[0], strict=True):
        assert got.token_ids == want.token_ids
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
