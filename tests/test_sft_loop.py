"""The SFT loop: perplexity, validation, pipelining, golden losses against a plain loop, NaN stops,
early stopping, checkpoint retention, asyncio and trio, logging and plots."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import trio
from _sft_helpers import ListLogger, addition_data, make_backend, make_model_dir

from rollouts.cli import main as cli_main
from rollouts.data import collate_padded
from rollouts.monitoring import JSONLLogger, plot_metrics
from rollouts.monitoring.logging import ProgressBar, TensorBoardLogger, WandbLogger, read_metrics
from rollouts.sft import SFTTrainingConfig, run_sft_training
from rollouts.training import (
    calculate_perplexity,
    run_validation_epoch,
)
from rollouts.training.backends import list_checkpoints
from rollouts.training.loop import NonFiniteLossError, TrainStep, run_training_epoch
from rollouts.training.losses import cross_entropy_loss


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("sft_model"))


@pytest.fixture(scope="module")
def train_data():
    return addition_data("train", 64)


@pytest.fixture(scope="module")
def val_data():
    return addition_data("val", 24)


def quiet(**fields: Any) -> SFTTrainingConfig:
    return SFTTrainingConfig(progress_bar=False, **fields)


def test_calculate_perplexity() -> None:
    assert calculate_perplexity(0.0) == 1.0
    assert calculate_perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert calculate_perplexity(50.0) == 1e6
    assert calculate_perplexity(math.inf) == math.inf
    assert math.isnan(calculate_perplexity(math.nan))


@pytest.mark.asyncio
async def test_validation_epoch_equals_a_plain_forward(model_dir, val_data, tmp_path) -> None:
    backend = make_backend(model_dir, tmp_path / "ckpt")
    with backend:
        assert await run_validation_epoch(backend, []) == {
            "loss": math.inf, "perplexity": math.inf, "num_tokens": 0,
        }  # fmt: skip
        batches = [collate_padded(val_data.examples[i : i + 10], 0) for i in range(0, 24, 10)]
        result = await run_validation_epoch(backend, batches)
        model = backend.model
    # Reference: every assistant token of the 24 examples, one mean, shift done here by hand.
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for example in val_data.examples:
            ids = torch.tensor([example.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            mask = torch.tensor(example.loss_mask[1:], dtype=torch.bool)
            nll_sum += F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum").item()
            count += int(mask.sum())
    assert result["num_tokens"] == count
    assert result["loss"] == pytest.approx(nll_sum / count, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll_sum / count), rel=1e-5)


class _Recording:
    """A backend wrapper that records the order of submissions."""

    def __init__(self, inner: Any, events: list[Any]) -> None:
        self.inner, self.events = inner, events
        self.queue_depth_max = inner.queue_depth_max

    def forward_backward(self, batch):
        self.events.append("fb")
        return self.inner.forward_backward(batch)

    def optim_step(self):
        self.events.append("opt")
        return self.inner.optim_step()


@pytest.mark.asyncio
async def test_training_epoch_submits_the_next_step_before_awaiting(
    model_dir, train_data, tmp_path
):
    events: list[Any] = []
    with make_backend(model_dir, tmp_path / "ckpt") as backend:
        steps = [
            TrainStep(index=i + 1, micro_batches=[collate_padded(train_data.examples[i::8], 0)],
                      num_examples=8, num_input_tokens=80)
            for i in range(3)
        ]  # fmt: skip
        outcome = await run_training_epoch(
            _Recording(backend, events), steps, lambda r: events.append(("done", r.step))
        )
        assert outcome["num_steps"] == 3
        # Step 2's calls are queued before step 1's result is handled, and so on.
        assert events == [
            "fb", "opt", "fb", "opt", ("done", 1), "fb", "opt", ("done", 2), ("done", 3),
        ]  # fmt: skip
        events.clear()
        blocking = await run_training_epoch(
            _Recording(backend, events), steps, lambda r: events.append(("done", r.step)), 0
        )
        assert events == ["fb", "opt", ("done", 4), "fb", "opt", ("done", 5), "fb", "opt",
                          ("done", 6)]  # fmt: skip
        assert blocking["num_steps"] == 3 and math.isfinite(blocking["loss"])
        with pytest.raises(ValueError, match=r"submit_ahead=3; must lie in \[0, 2\]"):
            await run_training_epoch(backend, steps, None, 3)


def _reference_losses(model_dir: Path, data, num_steps: int, batch_size: int, lr: float):
    """A plain PyTorch loop: consecutive examples, one padded batch per step, HF-style shift."""
    from rollouts.training.backends import load_hf_model

    model = load_hf_model(model_dir, torch.float32, None)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True
    )
    losses = []
    for step in range(num_steps):
        chunk = data.examples[step * batch_size : (step + 1) * batch_size]
        length = max(len(e.input_ids) for e in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        attention = torch.zeros(len(chunk), length, dtype=torch.long)
        weights = torch.zeros(len(chunk), length)
        for row, e in enumerate(chunk):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attention[row, : len(e.input_ids)] = 1
            weights[row, : len(e.input_ids)] = torch.tensor(e.loss_mask, dtype=torch.float32)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (nll * weights[:, 1:].flatten()).sum() / weights[:, 1:].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.asyncio
async def test_golden_losses_reproduce_and_match_a_plain_loop(model_dir, train_data, tmp_path):
    # 4 micro-batches of 4 per step (exact accumulation), file order, constant learning rate.
    config = quiet(max_steps=4, micro_batch_size=4, grad_accum_steps=4, shuffle=False,
                   eval_at_start=False, save_final=False)  # fmt: skip
    runs = []
    for attempt in range(2):
        logger = ListLogger()
        with make_backend(model_dir, tmp_path / f"ckpt{attempt}", lr=1e-2) as backend:
            await run_sft_training(backend, train_data, config, logger=logger)
        runs.append(logger.train_losses())
    assert runs[0] == runs[1]  # same seed: the very same floats
    reference = _reference_losses(model_dir, train_data, 4, 16, lr=1e-2)
    ours = [runs[0][step] for step in (1, 2, 3, 4)]
    assert reference[0] > reference[-1] + 0.1, "the reference must actually train"
    assert max(abs(a - b) for a, b in zip(ours, reference, strict=True)) < 2e-5, (ours, reference)


@pytest.mark.asyncio
async def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    model_dir, train_data, tmp_path
) -> None:
    calls = {"n": 0}

    def nan_at_fifth_step(logits, batch):
        calls["n"] += 1
        loss = cross_entropy_loss(logits, batch)
        return loss * math.nan if calls["n"] == 5 else loss

    config = quiet(max_steps=8, micro_batch_size=8, save_every_steps=2, eval_at_start=False)
    backend = make_backend(model_dir, tmp_path / "ckpt", loss_fn=nan_at_fifth_step)
    with (
        backend,
        pytest.raises(NonFiniteLossError, match="training loss is nan at optimizer step 5"),
    ):
        await run_sft_training(backend, train_data, config)
    assert [p.name for p in list_checkpoints(tmp_path / "ckpt")] == [
        "step_00000002",
        "step_00000004",
    ]


@pytest.mark.asyncio
async def test_early_stopping_and_checkpoint_retention(model_dir, train_data, val_data, tmp_path):
    # min_delta is so large that only the first evaluation counts as an improvement.
    config = quiet(max_steps=40, micro_batch_size=8, eval_every_steps=2, save_every_steps=1,
                   keep_last_checkpoints=2, early_stopping_patience=3,
                   early_stopping_min_delta=100.0)  # fmt: skip
    logger = ListLogger()
    with make_backend(model_dir, tmp_path / "ckpt") as backend:
        result = await run_sft_training(backend, train_data, config, val_data, logger)
    assert result.stop_reason == "early_stopping" and result.final_step == 8
    assert [e["step"] for e in result.evals] == [0, 2, 4, 6, 8]
    # best (step 2), the last two periodic (7, 8), the final (8): nothing else.
    names = [p.name for p in list_checkpoints(tmp_path / "ckpt")]
    assert names == ["step_00000002", "step_00000007", "step_00000008"]
    assert result.best_checkpoint == tmp_path / "ckpt" / "step_00000002"
    assert result.final_checkpoint == tmp_path / "ckpt" / "step_00000008"
    state = json.loads((result.final_checkpoint / "sft_state.json").read_text())
    assert (
        state["step"] == 8 and state["best_step"] == 2 and state["evals_without_improvement"] == 3
    )
    train = [r for r in logger.records if r["kind"] == "train"]
    assert len(train) == 8
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "examples_per_s",
        "step_time_s",
        "rss_mb",
    ):
        assert all(math.isfinite(r[key]) and r[key] >= 0 for r in train), key


def test_runs_under_trio_like_asyncio(model_dir, train_data, tmp_path) -> None:
    config = quiet(max_steps=3, micro_batch_size=8, eval_at_start=False, save_final=False)

    async def one_run(name: str) -> dict[int, float]:
        logger = ListLogger()
        with make_backend(model_dir, tmp_path / name) as backend:
            await run_sft_training(backend, train_data, config, logger=logger)
        return logger.train_losses()

    assert trio.run(one_run, "trio") == asyncio.run(one_run("asyncio"))


@pytest.mark.asyncio
async def test_refuses_to_mix_runs_and_mismatched_resumes(model_dir, train_data, tmp_path) -> None:
    config = quiet(max_steps=2, micro_batch_size=8, eval_at_start=False)
    with make_backend(model_dir, tmp_path / "ckpt") as backend:
        await run_sft_training(backend, train_data, config)
    refused = pytest.raises(ValueError, match=r"already holds checkpoints .* pass resume=True")
    with make_backend(model_dir, tmp_path / "ckpt") as backend, refused:
        await run_sft_training(backend, train_data, config)
    with make_backend(model_dir, tmp_path / "ckpt") as backend:
        changed = quiet(max_steps=2, micro_batch_size=8, resume=True, seed=1)
        with pytest.raises(ValueError, match=r"config\.seed was 0 there and is 1 now"):
            await run_sft_training(backend, train_data, changed)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("micro_batch_size", 0, r"SFTTrainingConfig.micro_batch_size=0; must be >= 1"),
        ("decay_style", "cubic", r"SFTTrainingConfig.decay_style='cubic'"),
        ("learning_rate", -1.0, r"SFTTrainingConfig.learning_rate=-1.0; must be > 0"),
        ("warmup_ratio", 1.5, r"SFTTrainingConfig.warmup_ratio=1.5"),
        ("save_every_steps", -2, r"SFTTrainingConfig.save_every_steps=-2; must be >= 0"),
    ],
)
def test_config_validation_names_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SFTTrainingConfig(**{field: value})


def test_jsonl_logger_plot_and_cli(tmp_path: Path) -> None:
    logger = JSONLLogger(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        logger.log({"kind": "train", "step": step, "loss": 3.0 / step, "lr": 1e-3,
                    "grad_norm": 1.0, "reward_mean": step / 5})  # fmt: skip
        # Flushed per call: readable while the logger is open.
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == step
    logger.log({"kind": "eval", "step": 5, "val_loss": math.inf, "path": tmp_path})
    logger.close()
    (eval_record,) = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert eval_record["val_loss"] == "inf" and eval_record["path"] == str(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "st')  # a torn last line, as after a kill
    assert len(read_metrics(tmp_path)) == 6
    png = plot_metrics(tmp_path, tmp_path / "out.png")
    assert png.stat().st_size > 10_000
    assert cli_main(["plot", str(tmp_path)]) == 0 and (tmp_path / "metrics.png").is_file()
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_metrics(tmp_path / "nowhere")


def test_optional_sinks_say_what_to_install(tmp_path: Path) -> None:
    for sink, extra in ((lambda: WandbLogger("p"), "wandb"),
                        (lambda: TensorBoardLogger(tmp_path), "tensorboard")):  # fmt: skip
        try:
            __import__(extra)
        except ImportError:
            with pytest.raises(ImportError, match=rf"pip install 'rollouts\[{extra}\]'"):
                sink()


def test_progress_bar_is_silent_without_a_terminal(capsys) -> None:
    bar = ProgressBar(total=3, enabled=True)  # pytest's stderr is not a TTY
    bar.update(2, {"loss": 1.0})
    bar.close()
    assert capsys.readouterr().err == ""


@pytest.mark.asyncio
async def test_packing_run_and_mfu(model_dir, tmp_path) -> None:
    from rollouts.sft.train import count_sft_steps

    train_data = addition_data("train", 64, max_length=32)

    packed = quiet(num_epochs=1, micro_batch_size=4, packing=True, eval_at_start=False,
                   peak_flops_per_s=1e12)  # fmt: skip
    padded = quiet(num_epochs=1, micro_batch_size=4, eval_at_start=False)
    # Rows of 31 positions hold two or three examples of 10 to 13 tokens: fewer, fuller steps.
    assert count_sft_steps(train_data, packed) < count_sft_steps(train_data, padded)
    logger = ListLogger()
    with make_backend(model_dir, tmp_path / "ckpt") as backend:
        await run_sft_training(backend, train_data, packed, logger=logger)
        num_params = sum(p.numel() for p in backend.model.parameters())
    train = [r for r in logger.records if r["kind"] == "train"]
    assert len(train) == count_sft_steps(train_data, packed)
    assert sum(r["num_loss_tokens"] for r in train) == sum(
        sum(e.loss_mask[1:]) for e in train_data.examples
    )  # every assistant token of the epoch, once
    for record in train:
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * 6 * num_params / 1e12)
