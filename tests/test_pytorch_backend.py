"""PyTorchTrainingBackend against independent references: a plain loop, a concatenated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch

from rollouts.training import BackendFailedError, PyTorchTrainingBackend, TrainingBackend
from rollouts.training.backends import (
    create_adamw_optimizer,
    create_cross_entropy_loss,
    find_latest_checkpoint,
    load_hf_model,
)
from rollouts.training.errors import NoWeightedTokensError
from rollouts.training.losses import cross_entropy_loss

LR = 1e-3


def build_backend(model_dir: Path, checkpoint_dir: Path, **kwargs) -> PyTorchTrainingBackend:
    model = load_hf_model(model_dir, torch.float32, None)
    optimizer = create_adamw_optimizer(model, LR, weight_decay=0.01)
    return PyTorchTrainingBackend(
        model, optimizer, create_cross_entropy_loss(), checkpoint_dir, "cpu", **kwargs
    )


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_is_a_training_backend(tiny_model_dir: Path, tmp_path: Path) -> None:
    with build_backend(tiny_model_dir, tmp_path) as backend:
        assert isinstance(backend, TrainingBackend)


@pytest.mark.parametrize("head_chunk_logits", [None, 64 * 5], ids=["full_logits", "chunked"])
def test_golden_losses_equal_a_plain_loop(
    tiny_model_dir: Path, tmp_path: Path, head_chunk_logits: int | None
) -> None:
    batches = [make_batch(seed, ignore_prefix=(0, 3, 7, 1)) for seed in range(6)]

    # The reference: a hand-written loop with torch's AdamW (fused, as the factory picks on CPU).
    model = load_hf_model(tiny_model_dir, torch.float32, None)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, fused=True
    )
    reference_losses = []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        reference_losses.append(loss.item())

    with build_backend(tiny_model_dir, tmp_path, head_chunk_logits=head_chunk_logits) as backend:
        losses = []
        for batch in batches:
            losses.append(backend.forward_backward(batch).wait()["loss"])
            backend.optim_step().wait()
        weights = backend.get_weights().wait()

    if head_chunk_logits is None:
        # With the model's full logits, one forward_backward per step does the reference's
        # arithmetic exactly: bit-identical.
        assert losses == reference_losses
        assert max_param_diff(weights, model.state_dict()) == 0.0
    else:  # the head at weighted positions, 5 at a time: the same sums in another order
        assert losses == pytest.approx(reference_losses, rel=1e-6)
        assert max_param_diff(weights, model.state_dict()) < 1e-5
    assert reference_losses[-1] < reference_losses[0]  # the check is about a model that moved


@pytest.mark.parametrize("normalization", ["token_mean", "sum"])
def test_gradient_accumulation_is_exact(
    tiny_model_dir: Path, tmp_path: Path, normalization: str
) -> None:
    # Micro-batches with very different numbers of valid tokens, and a loss mask with weights.
    micro_batches = [
        make_batch(10, batch_size=2, ignore_prefix=(0, 0)),
        make_batch(11, batch_size=3, ignore_prefix=(14, 15, 2)),
        make_batch(12, batch_size=1, ignore_prefix=(9,)),
    ]
    micro_batches[0]["loss_mask"] = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    for micro in micro_batches[1:]:
        micro["loss_mask"] = torch.ones_like(micro["labels"], dtype=torch.float32)
    whole = {key: torch.cat([m[key] for m in micro_batches]) for key in micro_batches[0]}

    def run(batches: list[dict[str, torch.Tensor]], directory: Path) -> tuple[dict, list[dict]]:
        with build_backend(
            tiny_model_dir, directory, normalization=normalization, max_grad_norm=None
        ) as backend:
            for _ in range(3):
                futures = [backend.forward_backward(b) for b in batches]
                step = backend.optim_step().wait()
            return backend.get_weights().wait(), [f.wait() for f in futures] + [step]

    split_weights, split_results = run(micro_batches, tmp_path / "split")
    whole_weights, whole_results = run([whole], tmp_path / "whole")
    assert max_param_diff(split_weights, whole_weights) < 1e-5
    assert split_results[-1]["grad_norm"] == pytest.approx(whole_results[-1]["grad_norm"], rel=1e-4)
    assert split_results[-1]["num_tokens"] == whole_results[-1]["num_tokens"]


def test_naive_average_of_micro_batch_means_would_differ(tiny_model_dir: Path) -> None:
    # Guards the test above: with these micro-batches a mean of means is a different gradient.
    micro_batches = [make_batch(11, batch_size=3, ignore_prefix=(14, 15, 2)), make_batch(10, 2)]
    model = load_hf_model(tiny_model_dir, torch.float32, None)
    loss_fn = create_cross_entropy_loss()
    means = [loss_fn(model(input_ids=b["input_ids"]).logits, b) for b in micro_batches]
    whole = {k: torch.cat([b[k] for b in micro_batches]) for k in micro_batches[0]}
    whole_mean = loss_fn(model(input_ids=whole["input_ids"]).logits, whole)
    assert abs((sum(means) / 2 - whole_mean).item()) > 1e-3


def test_forward_returns_label_logprobs_without_gradients(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    batch = make_batch(3, ignore_prefix=(2, 0, 0, 5))
    model = load_hf_model(tiny_model_dir, torch.float32, None)
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=batch["input_ids"]).logits, dim=-1)
    with build_backend(tiny_model_dir, tmp_path) as backend:
        result = backend.forward(batch).wait()
        with pytest.raises(NoWeightedTokensError, match="no forward_backward"):
            backend.optim_step().wait()  # forward left no gradient behind
    valid = batch["labels"] != -100
    gathered = expected.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert result["logprobs"].shape == batch["labels"].shape
    torch.testing.assert_close(result["logprobs"][valid], gathered[valid])
    assert (result["logprobs"][~valid] == 0).all()
    assert result["loss"] == pytest.approx(-gathered[valid].mean().item(), abs=1e-6)
    assert result["num_tokens"] == int(valid.sum())


def test_queued_calls_run_in_submission_order(tiny_model_dir: Path, tmp_path: Path) -> None:
    batch = make_batch(5)
    with build_backend(tiny_model_dir, tmp_path) as backend:
        before = backend.forward(batch)
        futures = [backend.forward_backward(batch), backend.optim_step(), backend.forward(batch)]
        weights = backend.get_weights()
        second_step = [backend.forward_backward(batch), backend.optim_step()]
        after_two = backend.forward(batch)
        # Nothing awaited until here: every result must reflect only the calls queued before it.
        assert futures[1].wait()["step"] == 1
        assert second_step[1].wait()["step"] == 2
        assert futures[0].wait()["loss"] == pytest.approx(before.wait()["loss"], abs=1e-6)
        assert futures[2].wait()["loss"] < before.wait()["loss"]
        assert after_two.wait()["loss"] < futures[2].wait()["loss"]
        snapshot = weights.wait()
        final = backend.get_weights().wait()
    assert max_param_diff(snapshot, final) > 0  # the snapshot was taken between the two steps


def test_get_weights_is_a_copy_not_a_view(tiny_model_dir: Path, tmp_path: Path) -> None:
    with build_backend(tiny_model_dir, tmp_path) as backend:
        weights = backend.get_weights().wait()
        frozen = {k: v.clone() for k, v in weights.items()}
        backend.forward_backward(make_batch(0)).wait()
        backend.optim_step().wait()
        live = dict(backend.model.state_dict())
        name = "model.embed_tokens.weight"
        assert weights[name].data_ptr() != live[name].data_ptr()
        assert max_param_diff(weights, frozen) == 0.0
        assert max_param_diff(weights, backend.get_weights().wait()) > 0


def test_checkpoint_round_trip_continues_with_identical_losses(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    batches = [make_batch(seed, ignore_prefix=(1, 2, 3, 4)) for seed in range(6)]

    def train(backend: PyTorchTrainingBackend, some: list) -> list[float]:
        losses = []
        for batch in some:
            losses.append(backend.forward_backward(batch).wait()["loss"])
            backend.optim_step().wait()
        return losses

    with build_backend(tiny_model_dir, tmp_path / "a", max_grad_norm=0.5) as backend:
        train(backend, batches[:3])
        path = backend.save_checkpoint(3).wait()
        torch.manual_seed(999)  # the RNG state must come from the checkpoint, not from here
        uninterrupted = train(backend, batches[3:])
        final = backend.get_weights().wait()

    assert path == find_latest_checkpoint(tmp_path / "a")
    with build_backend(tiny_model_dir, tmp_path / "b", max_grad_norm=0.5) as resumed:
        assert resumed.load_checkpoint(path).wait() == {"step": 3}
        assert train(resumed, batches[3:]) == uninterrupted
        assert max_param_diff(resumed.get_weights().wait(), final) == 0.0
        assert resumed.step == 6


def test_checkpoint_restores_rng_and_scheduler(tiny_model_dir: Path, tmp_path: Path) -> None:
    from rollouts.training.backends import create_warmup_scheduler

    model = load_hf_model(tiny_model_dir, torch.float32, None)
    optimizer = create_adamw_optimizer(model, LR)
    scheduler = create_warmup_scheduler(optimizer, 2, 10, "linear")
    loss_fn = create_cross_entropy_loss()
    with PyTorchTrainingBackend(model, optimizer, loss_fn, tmp_path, "cpu", scheduler) as backend:
        for seed in range(3):
            backend.forward_backward(make_batch(seed)).wait()
            backend.optim_step().wait()
        path = backend.save_checkpoint(3).wait()
        expected_random = torch.rand(3)
        backend.forward_backward(make_batch(9)).wait()
        expected_lr = backend.optim_step().wait()["lr"]
        backend.scheduler.step()  # move the schedule on, so the load has to bring it back
        backend.load_checkpoint(path).wait()
        assert torch.equal(torch.rand(3), expected_random)
        backend.forward_backward(make_batch(9)).wait()
        assert backend.optim_step().wait()["lr"] == expected_lr


def test_crash_mid_save_keeps_the_last_good_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with build_backend(tiny_model_dir, tmp_path) as backend:
        backend.forward_backward(make_batch(0)).wait()
        backend.optim_step().wait()
        good = backend.save_checkpoint(1).wait()
        good_bytes = (good / "model.safetensors").read_bytes()

        def failing_save(*args: object, **kwargs: object) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(torch, "save", failing_save)
        with pytest.raises(OSError, match="disk full"):
            backend.save_checkpoint(1).wait()  # overwriting the same step
    assert (good / "model.safetensors").read_bytes() == good_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


def test_save_refuses_unapplied_gradients(tiny_model_dir: Path, tmp_path: Path) -> None:
    with build_backend(tiny_model_dir, tmp_path) as backend:
        backend.forward_backward(make_batch(0)).wait()
        with pytest.raises(RuntimeError, match="gradients not yet applied"):
            backend.save_checkpoint(0).wait()


def test_load_of_a_missing_checkpoint_names_the_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    with (
        build_backend(tiny_model_dir, tmp_path) as backend,
        pytest.raises(FileNotFoundError, match="step_00000007"),
    ):
        backend.load_checkpoint(tmp_path / "step_00000007").wait()


def test_worker_exception_reaches_awaiter_then_backend_refuses(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    class BrokenBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
            raise ZeroDivisionError("broken loss")

    def broken_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return BrokenBackward.apply(cross_entropy_loss(logits, batch))

    model = load_hf_model(tiny_model_dir, torch.float32, None)
    optimizer = create_adamw_optimizer(model, LR)
    backend = PyTorchTrainingBackend(model, optimizer, broken_loss, tmp_path, "cpu")
    failing = backend.forward_backward(make_batch(0))
    queued = backend.optim_step()
    with pytest.raises(ZeroDivisionError, match="broken loss") as info:
        failing.wait(timeout=30)
    assert any(entry.name == "backward" for entry in info.traceback)
    with pytest.raises(BackendFailedError, match="forward_backward#1") as queued_info:
        queued.wait(timeout=30)
    assert isinstance(queued_info.value.__cause__, ZeroDivisionError)
    with pytest.raises(BackendFailedError, match="refuses forward#3"):
        backend.forward(make_batch(0))
    backend.close()


def test_non_finite_gradient_leaves_weights_untouched(tiny_model_dir: Path, tmp_path: Path) -> None:
    def nan_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return logits.mean() * float("nan")

    model = load_hf_model(tiny_model_dir, torch.float32, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = create_adamw_optimizer(model, LR)
    with PyTorchTrainingBackend(model, optimizer, nan_loss, tmp_path, "cpu") as backend:
        backend.forward_backward(make_batch(0)).wait()
        with pytest.raises(FloatingPointError, match="optim_step 1: gradient norm is nan"):
            backend.optim_step().wait()
        assert max_param_diff(before, dict(model.state_dict())) == 0.0


def test_bf16_autocast_trains_close_to_fp32(tiny_model_dir: Path, tmp_path: Path) -> None:
    batches = [make_batch(seed) for seed in range(3)]
    losses = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with build_backend(tiny_model_dir, tmp_path / name, autocast_dtype=dtype) as backend:
            losses[name] = []
            for batch in batches:
                losses[name].append(backend.forward_backward(batch).wait()["loss"])
                backend.optim_step().wait()
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bf16
    assert max(abs(a - b) for a, b in zip(losses["bf16"], losses["fp32"], strict=True)) < 0.05


def test_constructor_rejects_bad_arguments(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_hf_model(tiny_model_dir, torch.float32, None)
    optimizer = create_adamw_optimizer(model, LR)
    loss_fn = create_cross_entropy_loss()
    with pytest.raises(ValueError, match="normalization='mean'"):
        PyTorchTrainingBackend(model, optimizer, loss_fn, tmp_path, "cpu", normalization="mean")
    with pytest.raises(ValueError, match="'cuda:0' was asked for"):
        PyTorchTrainingBackend(model, optimizer, loss_fn, tmp_path, "cuda:0")
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        PyTorchTrainingBackend(model, optimizer, loss_fn, tmp_path, "cpu", max_grad_norm=0.0)


def test_num_threads_applies_to_the_worker_thread_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    caller_threads = torch.get_num_threads()
    with build_backend(tiny_model_dir, tmp_path, num_threads=1) as backend:
        assert backend._worker.submit("probe", torch.get_num_threads).wait() == 1
        backend.forward_backward(make_batch(0))
        assert backend.optim_step().wait()["step"] == 1
    assert torch.get_num_threads() == caller_threads
    with pytest.raises(ValueError, match="num_threads must be None"):
        build_backend(tiny_model_dir, tmp_path, num_threads=0)
    with pytest.raises(ValueError, match=r"'auto' or an int >= 1, got 'many'"):
        build_backend(tiny_model_dir, tmp_path, num_threads="many")


def test_auto_threads_picks_a_count_on_the_worker_and_leaves_the_caller(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from rollouts.core.threads import pick_cpu_threads

    caller_threads = torch.get_num_threads()
    assert 1 <= pick_cpu_threads() <= caller_threads
    assert pick_cpu_threads(max_threads=1) == 1
    assert torch.get_num_threads() == caller_threads, "the probe restores the count"
    with build_backend(tiny_model_dir, tmp_path, num_threads="auto") as backend:
        chosen = backend._worker.submit("probe", torch.get_num_threads).wait()
        assert 1 <= chosen <= caller_threads
        backend.forward_backward(make_batch(0))
        assert backend.optim_step().wait()["step"] == 1
    assert torch.get_num_threads() == caller_threads


def test_rl_batches_get_the_trainers_logprobs_from_forward_backward(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    batch = make_batch(4, ignore_prefix=(3, 0, 5, 1))
    rl_batch = {**batch, "sampling_logprobs": torch.zeros(batch["labels"].shape)}
    with build_backend(tiny_model_dir, tmp_path) as backend:
        before = backend.forward(batch).wait()["logprobs"]
        assert "logprobs" not in backend.forward_backward(batch).wait()  # not an RL batch
        result = backend.forward_backward(rl_batch).wait()
    torch.testing.assert_close(result["logprobs"], before)


def test_a_crash_between_the_renames_is_repaired_by_the_next_save(tmp_path: Path) -> None:
    from rollouts.training.backends.checkpointing import atomic_directory, checkpoint_path

    final = checkpoint_path(tmp_path, 3)
    final.mkdir(parents=True)
    (final / "weights").write_text("good")
    final.rename(tmp_path / ".old-step_00000003-1234abcd")  # moved aside, then the crash
    with pytest.raises(OSError, match="disk full"), atomic_directory(final):
        raise OSError("disk full")  # the next save fails too; the old checkpoint is back anyway
    assert (final / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_checkpoint_round_trip(tiny_model_dir: Path, tmp_path: Path) -> None:
    def build(directory: Path) -> PyTorchTrainingBackend:
        model = load_hf_model(tiny_model_dir, torch.float32, {"": 0})
        return PyTorchTrainingBackend(
            model, create_adamw_optimizer(model, LR), create_cross_entropy_loss(), directory,
            "cuda:0",
        )  # fmt: skip

    batches = [make_batch(seed) for seed in range(4)]
    with build(tmp_path / "a") as backend:
        for batch in batches[:2]:
            backend.forward_backward(batch)
            backend.optim_step()
        path = backend.save_checkpoint(2).wait()
        expected = [(backend.forward_backward(b), backend.optim_step()) for b in batches[2:]]
        expected_losses = [fb.wait()["loss"] for fb, _ in expected]
    with build(tmp_path / "b") as resumed:
        resumed.load_checkpoint(path).wait()  # RNG state stays on CPU, optimizer state on GPU
        losses = [resumed.forward_backward(b).wait()["loss"] for b in batches[2:3]]
    assert losses == expected_losses[:1]
