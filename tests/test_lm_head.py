"""The LM head and loss at weighted positions only, in chunks (`rollouts.training.lm_head`),
against a plain PyTorch reference that computes the model's full logits: every loss, tied and
untied heads, LoRA, a soft-capped architecture and two FSDP ranks."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import init_spawned_rank, spawn_ranks, tiny_llama_config
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

from rollouts.training import PyTorchTrainingBackend
from rollouts.training.losses import (
    apply_temperature,
    cross_entropy_loss,
    label_logprobs,
    make_cross_entropy_loss,
    make_rl_loss,
    token_weights,
)

VOCAB = 256
CHUNK_POSITIONS = 7  # several chunks per call, the last one partial
LOSSES = {
    "cross_entropy": lambda: cross_entropy_loss,
    "cross_entropy_kl": lambda: make_cross_entropy_loss(kl_coef=0.1),
    "importance_sampling": lambda: make_rl_loss("importance_sampling"),
    "ppo": lambda: make_rl_loss("ppo"),
    "cispo": lambda: make_rl_loss("cispo"),
    "dro": lambda: make_rl_loss("dro", kl_coef=0.05),
}


def rl_batch(seed: int, weighted: bool = True) -> dict[str, Any]:
    """Prompt positions ignored (-100), a loss mask over part of the rest, RL fields and a
    sampling temperature: every entry a loss may read."""
    generator = torch.Generator().manual_seed(seed)
    size_B, length_T = 3, 20
    tokens = torch.randint(0, VOCAB, (size_B, length_T + 1), generator=generator)
    labels = tokens[:, 1:].clone()
    labels[:, :6] = -100
    batch: dict[str, Any] = {"input_ids": tokens[:, :-1], "labels": labels}
    if weighted:
        batch["loss_mask"] = (torch.rand(size_B, length_T, generator=generator) > 0.3).float()
    batch["advantages"] = torch.randn(size_B, length_T, generator=generator)
    batch["sampling_logprobs"] = -3 * torch.rand(size_B, length_T, generator=generator)
    batch["reference_logprobs"] = -3 * torch.rand(size_B, length_T, generator=generator)
    batch["temperature"] = 0.7
    return batch


def reference_step(model: torch.nn.Module, batch: dict[str, Any], loss_fn: Any) -> dict[str, Any]:
    """A plain loop's loss, gradients and log-probs from the model's full [B, T, V] logits."""
    model.zero_grad()
    logits = apply_temperature(model(input_ids=batch["input_ids"]).logits, batch)
    loss = loss_fn(logits, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {
        "loss": loss.item(),
        "grads": grads,
        "logprobs": label_logprobs(logits, batch["labels"]),
    }


def backend_step(
    model: torch.nn.Module, batch: dict[str, Any], loss_fn: Any, tmp_path: Path, **kwargs: Any
) -> dict[str, Any]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with PyTorchTrainingBackend(model, optimizer, loss_fn, tmp_path, "cpu", **kwargs) as backend:
        trained = backend.forward_backward(batch).wait(60)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        forward = backend.forward(batch).wait(60)
        asked = backend.forward_backward(batch, return_logprobs=True).wait(60)
    return {"trained": trained, "grads": grads, "forward": forward, "asked": asked}


def tiny_model(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied))


def assert_grads_close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:  # float32 rounding, relative to the tensor's largest entry
        scale = float(theirs[name].abs().max())
        difference = float((ours[name] - theirs[name]).abs().max())
        assert difference <= 1e-5 * scale + 1e-9, (name, difference, scale)


class HeadCalls:
    """Counts the rows the LM head computes, per call."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.rows: list[int] = []
        head.register_forward_hook(lambda _m, args, _out: self.rows.append(args[0][..., 0].numel()))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_every_loss_equals_the_full_logits(loss_name: str, tied: bool, tmp_path: Path) -> None:
    batch = rl_batch(seed=1)
    loss_fn = LOSSES[loss_name]()
    model = tiny_model(tied)
    theirs = reference_step(copy.deepcopy(model), batch, loss_fn)
    calls = HeadCalls(model.lm_head)
    ours = backend_step(model, batch, loss_fn, tmp_path, head_chunk_logits=CHUNK_POSITIONS * VOCAB)

    assert ours["trained"]["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-7)
    assert ours["forward"]["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-7)
    assert_grads_close(ours["grads"], theirs["grads"])
    # forward and an asked-for forward_backward: every labelled position; an RL batch's own
    # log-probs: its weighted ones (the rest 0).
    labelled = batch["labels"] != -100
    weighted = token_weights(batch) != 0
    for key in ("forward", "asked"):
        torch.testing.assert_close(ours[key]["logprobs"], theirs["logprobs"], rtol=1e-5, atol=1e-6)
    expected = theirs["logprobs"] * weighted
    torch.testing.assert_close(ours["trained"]["logprobs"], expected, rtol=1e-5, atol=1e-6)

    # The head ran on the kept positions only, never more than a chunk at once.
    kept_per_call = [int(weighted.sum()), int(labelled.sum()), int(labelled.sum())]
    assert max(calls.rows) <= CHUNK_POSITIONS
    assert sum(calls.rows) == sum(kept_per_call)
    assert int(weighted.sum()) <= weighted.numel() // 2  # the saving is real in this batch


def test_unweighted_cross_entropy_equals_torch_cross_entropy(tmp_path: Path) -> None:
    """The default path against F.cross_entropy itself, over a few optimizer steps of AdamW."""
    batches = [rl_batch(seed, weighted=False) for seed in range(3)]
    for batch in batches:
        del batch["temperature"]
    reference, model = tiny_model(), tiny_model()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    losses = []
    for batch in batches:
        logits = reference(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    ours = []
    with PyTorchTrainingBackend(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        cross_entropy_loss,
        tmp_path,
        "cpu",
        max_grad_norm=None,
        head_chunk_logits=CHUNK_POSITIONS * VOCAB,
    ) as backend:
        for batch in batches:
            ours.append(backend.forward_backward(batch).wait(60)["loss"])
            backend.optim_step().wait(60)
    assert ours == pytest.approx(losses, rel=1e-5)
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(
            mine, theirs, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_full_logits_when_asked_or_when_not_exact(tmp_path: Path) -> None:
    """head_chunk_logits=None, a loss not marked token-local, or a soft-capped architecture:
    the model's own full logits (the head sees every position at once)."""
    batch = rl_batch(seed=2)

    def custom_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return cross_entropy_loss(logits, batch)

    chunked = {"head_chunk_logits": CHUNK_POSITIONS * VOCAB}
    for loss_fn, options in [
        (cross_entropy_loss, {"head_chunk_logits": None}),
        (custom_loss, chunked),
    ]:
        model = tiny_model()
        calls = HeadCalls(model.lm_head)
        ours = backend_step(model, batch, loss_fn, tmp_path / loss_fn.__name__, **options)
        assert set(calls.rows) == {batch["labels"].numel()}
        assert ours["trained"]["loss"] == reference_step(tiny_model(), batch, loss_fn)["loss"]

    torch.manual_seed(0)
    config = Gemma2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        final_logit_softcapping=5.0,
    )
    gemma = Gemma2ForCausalLM(config)
    theirs = reference_step(copy.deepcopy(gemma), batch, cross_entropy_loss)
    calls = HeadCalls(gemma.lm_head)
    ours = backend_step(gemma, batch, cross_entropy_loss, tmp_path / "gemma", **chunked)
    assert set(calls.rows) == {batch["labels"].numel()}
    assert ours["trained"]["loss"] == pytest.approx(theirs["loss"], rel=1e-6)


def test_a_refused_loss_leaves_the_backend_usable(tmp_path: Path) -> None:
    """A loss that fails on the batch (PPO without advantages) fails before any backward: the
    next call needs no discard_gradients and gives the plain loop's gradients."""
    batch = rl_batch(seed=3)
    broken = {k: v for k, v in batch.items() if k != "advantages"}
    model = tiny_model()
    theirs = reference_step(copy.deepcopy(model), batch, make_rl_loss("ppo"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with PyTorchTrainingBackend(
        model, optimizer, make_rl_loss("ppo"), tmp_path, "cpu", head_chunk_logits=VOCAB * 7
    ) as backend:
        with pytest.raises(KeyError, match="advantages"):
            backend.forward_backward(broken).wait(60)
        assert backend.forward_backward(batch).wait(60)["loss"] == pytest.approx(theirs["loss"])
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, theirs["grads"])


def test_lora_with_an_adapted_head_equals_the_full_logits(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from rollouts.training.backends.lora import apply_lora

    batch = rl_batch(seed=4)
    model = apply_lora(tiny_model(), rank=4, lm_head=True)
    with torch.no_grad():  # adapters that change the output from the start
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    theirs = reference_step(copy.deepcopy(model), batch, cross_entropy_loss)
    ours = backend_step(model, batch, cross_entropy_loss, tmp_path, head_chunk_logits=5 * VOCAB)
    assert ours["trained"]["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    assert_grads_close(ours["grads"], theirs["grads"])


def test_auto_chunks_from_a_real_vocabulary_up(tmp_path: Path) -> None:
    """ "auto" (the default) keeps the full logits for a tiny vocabulary, where the head costs
    little, and chunks of 2^26 logits from 4,096 tokens up."""
    from rollouts.training.lm_head import head_chunk_tokens

    assert head_chunk_tokens("auto", VOCAB) is None
    assert head_chunk_tokens("auto", 49152) == 2**26 // 49152 == 1365
    assert head_chunk_tokens(VOCAB * 3, VOCAB) == 3
    assert head_chunk_tokens(None, 49152) is None
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=4096, hidden_size=32))
    calls = HeadCalls(model.lm_head)
    batch = rl_batch(seed=6)
    backend_step(model, batch, cross_entropy_loss, tmp_path)  # the default: "auto"
    assert max(calls.rows) < batch["labels"].numel()  # kept positions only


def test_a_bad_chunk_size_is_refused(tmp_path: Path) -> None:
    model = tiny_model()
    for bad in (0, -5, 1.5, True, "full"):
        with pytest.raises(ValueError, match="head_chunk_logits"):
            PyTorchTrainingBackend(
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                cross_entropy_loss,
                tmp_path,
                "cpu",
                head_chunk_logits=bad,
            )


# -- two FSDP ranks: the sharded head (all-gathered by the root's forward) -------------------------


def _fsdp_job(rank: int, tmp_dir: Path) -> None:
    from rollouts.training.backends.fsdp import FSDPTrainingBackend, shard_model
    from rollouts.training.distributed import init_distributed

    init_spawned_rank(rank, 2, tmp_dir)
    world = init_distributed()  # adopts the group created above
    model = shard_model(tiny_model(tied=True), world)
    calls = HeadCalls(model.lm_head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    backend = FSDPTrainingBackend(
        model, optimizer, make_rl_loss("ppo"), tmp_dir / "ckpt", world,
        head_chunk_logits=CHUNK_POSITIONS * VOCAB,
    )  # fmt: skip
    losses = []
    for seed in range(3):
        batch = {
            k: v[rank::2] if isinstance(v, torch.Tensor) else v for k, v in rl_batch(seed).items()
        }
        losses.append(backend.forward_backward(batch).wait(60)["loss"])
        backend.optim_step().wait(60)
    weights = backend.get_weights().wait(60)
    backend.close()
    if rank == 0:
        torch.save(weights, tmp_dir / "weights.pt")
        (tmp_dir / "losses.json").write_text(json.dumps(losses))
        (tmp_dir / "head_rows.json").write_text(json.dumps(calls.rows))
    torch.distributed.destroy_process_group()


def test_two_fsdp_ranks_equal_a_plain_loop(tmp_path: Path) -> None:
    spawn_ranks(_fsdp_job, (tmp_path,), 2)
    reference = tiny_model(tied=True)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    losses = []
    for seed in range(3):
        step = reference_step(reference, rl_batch(seed), make_rl_loss("ppo"))
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        losses.append(step["loss"])
    assert json.loads((tmp_path / "losses.json").read_text()) == pytest.approx(losses, rel=1e-5)
    assert 0 < max(json.loads((tmp_path / "head_rows.json").read_text())) <= CHUNK_POSITIONS
    weights = torch.load(tmp_path / "weights.pt")
    for name, param in reference.state_dict().items():
        torch.testing.assert_close(
            weights[name], param, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_a_right_padding_mask_is_dropped_and_a_left_padding_one_kept(tmp_path: Path) -> None:
    """Right padding hides nothing from a real position that the causal mask does not already
    hide: the backend drops that mask (attention's causal fast path) and matches a plain loop
    that passes it. Left padding does change real positions: that mask reaches the model."""
    for side in ("right", "left"):
        batch = rl_batch(seed=5)
        lengths = torch.tensor([20, 14, 9])
        real = torch.arange(20)[None] < lengths[:, None]
        if side == "left":
            real = real.flip(1)
        batch["attention_mask"] = real.long()
        batch["labels"] = batch["labels"].masked_fill(~real, -100)
        model = tiny_model()
        reference = copy.deepcopy(model)
        reference.zero_grad()
        logits = apply_temperature(
            reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch,
        )
        loss = cross_entropy_loss(logits, batch)
        loss.backward()
        seen: list[bool] = []
        model.register_forward_pre_hook(
            lambda _m, _a, kwargs, seen=seen: seen.append("attention_mask" in kwargs),
            with_kwargs=True,
        )
        ours = backend_step(model, batch, cross_entropy_loss, tmp_path / side)
        assert seen == [side == "left"] * 3
        # With position_ids the mask stays: without one, transformers would read restarting
        # positions as packed rows.
        with_positions = {**batch, "position_ids": torch.arange(20).expand(3, 20)}
        positioned, kept = tiny_model(), []
        positioned.register_forward_pre_hook(
            lambda _m, _a, kwargs, kept=kept: kept.append("attention_mask" in kwargs),
            with_kwargs=True,
        )
        backend_step(positioned, with_positions, cross_entropy_loss, tmp_path / f"{side}-p")
        assert kept == [True] * 3
        assert ours["trained"]["loss"] == pytest.approx(loss.item(), rel=1e-6)
        grads = {n: p.grad for n, p in reference.named_parameters()}
        assert_grads_close(ours["grads"], grads)


def test_activation_checkpointing_and_bf16_autocast_equal_the_full_logits(tmp_path: Path) -> None:
    """Recomputed blocks and a bf16 head under autocast: the same figures as the full logits
    computed the same way (to bf16 rounding)."""
    from rollouts.training.backends.pytorch_factory import enable_activation_checkpointing

    batch = rl_batch(seed=7)
    loss_fn = make_rl_loss("ppo")
    results = []
    for chunk in (None, CHUNK_POSITIONS * VOCAB):
        model = tiny_model(tied=True)
        enable_activation_checkpointing(model)
        results.append(
            backend_step(
                model,
                batch,
                loss_fn,
                tmp_path / str(chunk),
                head_chunk_logits=chunk,
                autocast_dtype=torch.bfloat16,
            )
        )
    full, chunked = results
    assert chunked["trained"]["loss"] == pytest.approx(full["trained"]["loss"], rel=2e-2, abs=1e-3)
    for name, grad in full["grads"].items():
        difference = float((chunked["grads"][name] - grad).abs().max())
        assert difference <= 3e-2 * float(grad.abs().max()) + 1e-6, name


def test_only_the_head_training_and_a_labelled_padding_and_a_wrapper(tmp_path: Path) -> None:
    """Three edges: a model whose only trained weight is the head (no decoder backward to run);
    a right padding that carries labels (the mask stays, those positions' values depend on it);
    a model nested in a wrapper that may change its logits (not swapped: full logits)."""
    from rollouts.training.lm_head import plain_head_owner

    batch = rl_batch(seed=8)
    model = tiny_model()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("lm_head"))
    theirs = reference_step(copy.deepcopy(model), batch, cross_entropy_loss)
    ours = backend_step(
        model, batch, cross_entropy_loss, tmp_path / "head", head_chunk_logits=7 * VOCAB
    )
    assert ours["trained"]["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    assert_grads_close(ours["grads"], theirs["grads"])

    padded = {**batch, "attention_mask": torch.ones(3, 20, dtype=torch.long)}
    padded["attention_mask"][1, 15:] = 0  # right padding, but position 15 of row 1 has a label
    assert padded["labels"][1, 15] != -100
    seen: list[bool] = []
    model = tiny_model()
    model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append("attention_mask" in kwargs), with_kwargs=True
    )
    backend_step(model, padded, cross_entropy_loss, tmp_path / "padded")
    assert seen == [True] * 3

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_model()

        def forward(self, **inputs: Any) -> torch.Tensor:
            return torch.tanh(self.inner(**inputs).logits)  # a soft-cap the head path would skip

    assert plain_head_owner(Wrapper()) is None
    assert plain_head_owner(tiny_model()) is not None
