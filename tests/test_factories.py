"""Tier 1 primitives and Tier 2 factories: valid input gives what the design notes say, bad input
gives a ValueError naming the value and the valid choices."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch

from rollouts.training import PyTorchTrainingBackend
from rollouts.training.backends import (
    compute_device_map_single_gpu,
    create_adamw_optimizer,
    create_backend_with_scheduler,
    create_cross_entropy_loss,
    create_pytorch_backend,
    create_warmup_cosine_scheduler,
    create_warmup_scheduler,
    load_hf_model,
    parse_dtype,
)


def test_parse_dtype() -> None:
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("float32") is torch.float32
    assert parse_dtype("float16") is torch.float16
    with pytest.raises(
        ValueError,
        match=r"Invalid dtype: 'fp17'. Must be one of \['bfloat16', 'float32', 'float16'\]",
    ):
        parse_dtype("fp17")


def test_compute_device_map_single_gpu() -> None:
    assert compute_device_map_single_gpu("cuda", 3) == {"": 3}
    assert compute_device_map_single_gpu("cpu", 0) is None
    assert compute_device_map_single_gpu("mps", 0) is None
    with pytest.raises(ValueError, match=r"Invalid device_type: 'tpu'. Must be one of"):
        compute_device_map_single_gpu("tpu", 0)
    with pytest.raises(ValueError, match=r"Invalid gpu_rank: -1"):
        compute_device_map_single_gpu("cuda", -1)


def test_load_hf_model_reads_the_saved_weights(tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    model = load_hf_model(tiny_model_dir, torch.float32, None)
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    state = model.state_dict()
    assert saved.keys() <= state.keys()
    assert all(torch.equal(state[name], saved[name]) for name in saved)
    assert load_hf_model(tiny_model_dir, torch.bfloat16, None).dtype == torch.bfloat16


def test_load_hf_model_names_a_bad_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a Hugging Face model directory"):
        load_hf_model(tmp_path, torch.float32, None)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_hf_model(tmp_path / "missing", torch.float32, None)


def test_create_adamw_optimizer(tiny_model_dir: Path) -> None:
    model = load_hf_model(tiny_model_dir, torch.float32, None)
    optimizer = create_adamw_optimizer(model, 3e-4, weight_decay=0.1)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        3e-4,
        (0.9, 0.95),
        1e-8,
        0.1,
    )
    assert len(group["params"]) == len(list(model.parameters()))
    for bad, match in [
        (dict(lr=0.0), "Invalid lr: 0.0. Must be > 0"),
        (dict(lr=1e-3, betas=(0.9, 1.0)), r"Invalid betas: \(0.9, 1.0\)"),
        (dict(lr=1e-3, betas=(0.0, 0.9)), "Invalid betas"),
        (dict(lr=1e-3, eps=0.0), "Invalid eps: 0.0"),
        (dict(lr=1e-3, weight_decay=-0.1), "Invalid weight_decay: -0.1"),
    ]:
        with pytest.raises(ValueError, match=match):
            create_adamw_optimizer(model, **bad)
    with pytest.warns(UserWarning, match="lr=2.0 is above 1.0"):
        create_adamw_optimizer(model, 2.0)


def test_cross_entropy_loss_matches_a_hand_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=generator)
    labels = torch.tensor([[1, 4, -100], [0, 2, 3]])
    loss_fn = create_cross_entropy_loss()
    log_probs = logits.log_softmax(-1)
    nll = [[-log_probs[b, t, max(0, int(labels[b, t]))].item() for t in range(3)] for b in range(2)]
    plain = (nll[0][0] + nll[0][1] + nll[1][0] + nll[1][1] + nll[1][2]) / 5
    assert loss_fn(logits, {"labels": labels}).item() == pytest.approx(plain, rel=1e-6)
    # With a mask of all ones: the plain mean. With weights: the weighted mean over weighted tokens.
    ones = torch.ones(2, 3)
    assert loss_fn(logits, {"labels": labels, "loss_mask": ones}).item() == pytest.approx(plain)
    mask = torch.tensor([[0.5, 0.0, 1.0], [2.0, 1.0, 0.0]])
    weighted = (0.5 * nll[0][0] + 2.0 * nll[1][0] + 1.0 * nll[1][1]) / 3.5
    assert loss_fn(logits, {"labels": labels, "loss_mask": mask}).item() == pytest.approx(weighted)


def test_cross_entropy_loss_gradient_and_empty_batch() -> None:
    logits = torch.randn(1, 2, 4, requires_grad=True)
    labels = torch.tensor([[2, -100]])
    create_cross_entropy_loss()(logits, {"labels": labels}).backward()
    expected = logits.detach()[0, 0].softmax(-1) - F.one_hot(torch.tensor(2), 4)
    torch.testing.assert_close(logits.grad[0, 0], expected)
    assert (logits.grad[0, 1] == 0).all()
    empty = create_cross_entropy_loss()(logits, {"labels": torch.full((1, 2), -100)})
    assert empty.item() == 0.0  # no token: zero loss, not NaN


def test_cross_entropy_loss_rejects_misaligned_labels() -> None:
    with pytest.raises(ValueError, match=r"logits have shape \(1, 3, 4\) but labels \(1, 2\)"):
        create_cross_entropy_loss()(
            torch.zeros(1, 3, 4),
            {"labels": torch.zeros(1, 2).long(), "loss_mask": torch.ones(1, 2)},
        )


def _lrs(decay_style: str, warmup: int, total: int, min_ratio: float, steps: int) -> list[float]:
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = create_warmup_scheduler(optimizer, warmup, total, decay_style, min_ratio)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_scheduler_values() -> None:
    base = 2.0
    # Warmup: 0.1x -> 1.0x linearly over 4 steps, i.e. 0.1, 0.325, 0.55, 0.775, then 1.0.
    warm = [base * (0.1 + 0.9 * s / 4) for s in range(4)]
    cosine = _lrs("cosine", 4, 14, 0.2, 16)
    assert cosine[:4] == pytest.approx(warm)
    for s in range(4, 16):
        progress = min(1.0, (s - 4) / 10)
        expected = base * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert cosine[s] == pytest.approx(expected), s
    assert cosine[14] == pytest.approx(base * 0.2) and cosine[15] == pytest.approx(base * 0.2)
    linear = _lrs("linear", 4, 14, 0.2, 15)
    assert linear[4] == pytest.approx(base) and linear[9] == pytest.approx(base * 0.6)
    assert linear[14] == pytest.approx(base * 0.2)
    assert _lrs("constant", 2, 10, 0.1, 12)[2:] == pytest.approx([base] * 10)
    assert _lrs("cosine", 0, 10, 0.1, 1) == pytest.approx([base])  # no warmup: full rate at once


def test_warmup_cosine_shorthand_equals_the_cosine_style() -> None:
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = create_warmup_cosine_scheduler(optimizer, 3, 9, min_lr_ratio=0.3)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([lr / 2.0 for lr in _lrs("cosine", 3, 9, 0.3, 10)])


@pytest.mark.parametrize(
    "args, match",
    [
        ((-1, 10, "cosine", 0.1), "Invalid num_warmup_steps: -1"),
        ((10, 10, "cosine", 0.1), r"Invalid num_training_steps: 10. Must be > num_warmup_steps"),
        ((1, 10, "cosine", 0.0), r"Invalid min_lr_ratio: 0.0. Must lie in \(0, 1\]"),
        ((1, 10, "cosine", 1.5), "Invalid min_lr_ratio: 1.5"),
        ((1, 10, "exponential", 0.1), r"Invalid decay_style: 'exponential'. Must be one of"),
    ],
)
def test_warmup_scheduler_rejects_bad_arguments(args: tuple, match: str) -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match=match):
        create_warmup_scheduler(optimizer, *args)


def test_create_pytorch_backend_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    backend = create_pytorch_backend(
        tiny_model_dir, tmp_path, device_type="cpu", dtype="float32", learning_rate=1e-3
    )
    with backend:
        assert isinstance(backend, PyTorchTrainingBackend)
        assert backend.optimizer.param_groups[0]["betas"] == (0.9, 0.95)
        batch = make_batch(0)
        first = backend.forward(batch).wait()["loss"]
        for _ in range(3):
            backend.forward_backward(batch)
            backend.optim_step()
        assert backend.forward(batch).wait()["loss"] < first


def test_create_pytorch_backend_names_a_missing_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="'cuda:0' was asked for, but CUDA is not available"):
        create_pytorch_backend(tiny_model_dir, tmp_path)  # device_type defaults to "cuda"


def test_create_backend_with_scheduler(tiny_model_dir: Path, tmp_path: Path) -> None:
    backend, scheduler = create_backend_with_scheduler(
        tiny_model_dir,
        tmp_path,
        num_training_steps=100,
        warmup_ratio=0.05,
        device_type="cpu",
        dtype="float32",
        learning_rate=1e-3,
        decay_style="linear",
    )
    with backend:
        assert backend.scheduler is scheduler
        lrs = []
        for _ in range(6):
            backend.forward_backward(make_batch(0))
            lrs.append(backend.optim_step().wait()["lr"])
    # num_warmup_steps = max(1, int(100 * 0.05)) = 5: 0.1x at step 0, 1.0x at step 5.
    assert lrs[0] == pytest.approx(1e-4) and lrs[5] == pytest.approx(1e-3)
    assert lrs[1] == pytest.approx(1e-3 * (0.1 + 0.9 / 5))
    with pytest.raises(ValueError, match="Invalid num_training_steps: 1"):
        create_backend_with_scheduler(
            tiny_model_dir, tmp_path, num_training_steps=1, device_type="cpu"
        )


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"lr": 1e-3}, TypeError, r"unknown option\(s\) \['lr'\]; valid: .*'learning_rate'"),
        ({"learning_rate": -1.0}, ValueError, "Invalid learning_rate: -1.0"),
        ({"adam_betas": (0.9, 1.5)}, ValueError, "Invalid adam_betas"),
        ({"mixed_precision": "fp8"}, ValueError, "Invalid dtype: 'fp8'"),
        ({"device_type": "tpu"}, ValueError, "Invalid device_type: 'tpu'"),
        ({"queue_depth_max": 0}, ValueError, "Invalid queue_depth_max: 0"),
        ({"num_training_steps": 1}, ValueError, "Invalid num_training_steps: 1"),
    ],
)
def test_both_factories_refuse_bad_options_before_loading_anything(
    tmp_path: Path, options: dict, error: type, match: str
) -> None:
    from rollouts.training.backends import create_fsdp_backend

    missing_model = tmp_path / "no_model_here"  # never reached: the options fail first
    for factory in (create_pytorch_backend, create_fsdp_backend):
        with pytest.raises(error, match=match):
            factory(missing_model, tmp_path, **{"device_type": "cpu", **options})


def test_both_factories_show_the_same_options_with_the_same_defaults() -> None:
    import inspect

    from rollouts.training.backends import create_fsdp_backend

    single = inspect.signature(create_pytorch_backend).parameters
    sharded = inspect.signature(create_fsdp_backend).parameters
    shared = [name for name in single if name not in ("model_name", "checkpoint_dir")]
    assert "learning_rate" in shared and "mixed_precision" in shared
    for name in shared:
        assert sharded[name].default == single[name].default, name
    assert set(sharded) - set(single) == {"world", "cpu_offload"}


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_activation_checkpointing_on_one_device_trains_alike(
    tiny_model_dir: Path, tmp_path: Path, lora_rank: int
) -> None:
    """Recomputing each block's activations in backward changes memory, not the numbers."""
    losses = {}
    for checkpointing in (False, True):
        backend = create_pytorch_backend(
            tiny_model_dir, tmp_path / str(checkpointing), device_type="cpu", learning_rate=1e-3,
            activation_checkpointing=checkpointing, lora_rank=lora_rank, num_threads=1,
        )  # fmt: skip
        with backend:
            losses[checkpointing] = []
            for step in range(3):
                result = backend.forward_backward(make_batch(step)).wait(60)
                losses[checkpointing].append((result["loss"], backend.optim_step().wait(60)))
    for (loss, stepped), (loss_ckpt, stepped_ckpt) in zip(losses[False], losses[True], strict=True):
        assert loss_ckpt == pytest.approx(loss, rel=1e-6)
        assert stepped_ckpt["grad_norm"] == pytest.approx(stepped["grad_norm"], rel=1e-5)
