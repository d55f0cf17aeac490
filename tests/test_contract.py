"""The contract a user lives with on one device: mistakes are refused without bricking the
backend, failures that leave state suspect are recoverable, the queue bound holds under await,
orchestrators never overflow it, and a script that forgets `close()` loses nothing."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import trio
from _rl_fakes import DigitsTask, PromptScriptedEngine
from conftest import VOCAB_SIZE, make_batch

from rollouts.core.worker import SerialWorker
from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.rl import RLTrainingConfig, run_rl_training
from rollouts.training import BackendFailedError, PyTorchTrainingBackend
from rollouts.training.backends import create_adamw_optimizer, load_hf_model
from rollouts.training.errors import (
    CallRefusedError,
    InvalidBatchError,
    NonFiniteGradientError,
    NoWeightedTokensError,
    PendingGradientsError,
)
from rollouts.training.losses import cross_entropy_loss, make_rl_loss

LR = 1e-3


def _backend(model_dir: Path, ckpt: Path, **kwargs) -> PyTorchTrainingBackend:
    model = load_hf_model(model_dir, torch.float32, None)
    loss_fn = kwargs.pop("loss_fn", cross_entropy_loss)
    return PyTorchTrainingBackend(
        model, create_adamw_optimizer(model, LR), loss_fn, ckpt, "cpu", **kwargs
    )


def _step(backend: PyTorchTrainingBackend, seed: int = 0) -> dict:
    backend.forward_backward(make_batch(seed))
    return backend.optim_step().wait(timeout=60)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b.pop("labels"), "needs 'labels'"),
        (lambda b: b.update(labels=b["labels"][:, :-1]), r"batch\['labels'\] has shape"),
        (lambda b: b.update(input_ids=b["input_ids"].float()), "must hold integers"),
        (lambda b: b["labels"].__setitem__((0, 0), VOCAB_SIZE), r"outside \[0, 256\) or -100"),
        (lambda b: b["input_ids"].__setitem__((1, 2), -3), r"-3 at position \(1, 2\)"),
        (lambda b: b.update(loss_mask=-torch.ones(4, 16)), "negative weights"),
        (lambda b: b.update(loss_mask=torch.full((4, 16), math.nan)), "NaN or inf"),
        (lambda b: b.update(attention_mask=torch.ones(4, 15)), r"'attention_mask'\] has shape"),
    ],
)
def test_a_bad_batch_is_refused_at_submission_and_the_next_step_works(
    tiny_model_dir: Path, tmp_path: Path, mutate, match: str
) -> None:
    with _backend(tiny_model_dir, tmp_path) as backend:
        batch = make_batch(0)
        mutate(batch)
        for call in (backend.forward_backward, backend.forward):
            with pytest.raises(InvalidBatchError, match=match):
                call(batch)
        assert backend._worker.pending == 0, "nothing was queued"
        assert _step(backend)["step"] == 1


def test_forward_without_labels_names_the_key_and_keeps_the_backend(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with _backend(tiny_model_dir, tmp_path) as backend:
        with pytest.raises(InvalidBatchError, match="needs 'labels'"):
            backend.forward({"input_ids": make_batch(0)["input_ids"]})
        path = backend.save_checkpoint(0).wait(timeout=60)
        assert (path / "model.safetensors").is_file()
        assert backend.export_hf(tmp_path / "hf").wait(timeout=60).is_dir()


def test_refused_save_then_step_then_save(tiny_model_dir: Path, tmp_path: Path) -> None:
    with _backend(tiny_model_dir, tmp_path) as backend:
        backend.forward_backward(make_batch(0))
        refused = backend.save_checkpoint(1)
        stepped = backend.optim_step()  # queued behind the refusal: it must still run
        saved = backend.save_checkpoint(1)
        with pytest.raises(PendingGradientsError, match="not yet applied"):
            refused.wait(timeout=60)
        assert stepped.wait(timeout=60)["step"] == 1
        assert saved.wait(timeout=60) == backend.find_checkpoint(1).path
        assert [c.step for c in backend.list_checkpoints()] == [1]


def test_a_step_with_no_weighted_token_is_refused_and_the_next_works(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with _backend(tiny_model_dir, tmp_path) as backend:
        before = backend.get_weights().wait(timeout=60)
        masked = make_batch(0)
        masked["labels"][:] = -100
        backend.forward_backward(masked)
        with pytest.raises(NoWeightedTokensError, match="carried no weighted token"):
            backend.optim_step().wait(timeout=60)
        after = backend.get_weights().wait(timeout=60)
        assert all(torch.equal(before[k], after[k]) for k in before), "nothing was applied"
        assert _step(backend)["step"] == 1
        assert backend.save_checkpoint(1).wait(timeout=60).is_dir(), "no gradient left pending"


def test_a_non_finite_gradient_is_refused_and_the_next_step_works(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    def sometimes_nan(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        loss = cross_entropy_loss(logits, batch)
        return loss * math.inf if batch.get("poison") is not None else loss

    with _backend(tiny_model_dir, tmp_path, loss_fn=sometimes_nan) as backend:
        poisoned = make_batch(0) | {"poison": torch.ones(1)}
        backend.forward_backward(poisoned)
        with pytest.raises(NonFiniteGradientError) as info:
            backend.optim_step().wait(timeout=60)
        assert isinstance(info.value, CallRefusedError) and isinstance(
            info.value, FloatingPointError
        )
        assert _step(backend)["step"] == 1


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory (simulated) in backward")


def test_a_failure_in_backward_stops_the_stream_until_gradients_are_discarded(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    def loss_fn(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        loss = cross_entropy_loss(logits, batch)
        return _FailingBackward.apply(loss) if batch.get("poison") is not None else loss

    with _backend(tiny_model_dir, tmp_path, loss_fn=loss_fn) as backend:
        failing = backend.forward_backward(make_batch(0) | {"poison": torch.ones(1)})
        skipped = backend.optim_step()
        with pytest.raises(RuntimeError, match="simulated"):
            failing.wait(timeout=60)
        with pytest.raises(BackendFailedError, match="gradients half-changed"):
            skipped.wait(timeout=60)
        with pytest.raises(BackendFailedError, match=r"discard_gradients\(\)"):
            backend.forward(make_batch(1))  # refused at once, naming the recovery
        assert backend.discard_gradients().wait(timeout=60) == {"discarded_calls": 0}
        assert _step(backend)["step"] == 1  # usable again


def test_a_failure_in_the_optimizer_step_is_repaired_by_load_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with _backend(tiny_model_dir, tmp_path) as backend:
        _step(backend)
        good = backend.save_checkpoint(1).wait(timeout=60)
        saved = backend.get_weights().wait(timeout=60)
        real_step = backend.optimizer.step

        def half_step(*args, **kwargs):
            next(iter(backend.model.parameters())).data.add_(1.0)  # half an update
            raise RuntimeError("device lost mid-update (simulated)")

        backend.optimizer.step = half_step
        backend.forward_backward(make_batch(1))
        with pytest.raises(RuntimeError, match="simulated"):
            backend.optim_step().wait(timeout=60)
        with pytest.raises(BackendFailedError, match=r"weights half-changed.*load_checkpoint"):
            backend.discard_gradients()  # does not repair weights: refused
        backend.optimizer.step = real_step
        assert backend.load_checkpoint(good).wait(timeout=60) == {"step": 1}
        restored = backend.get_weights().wait(timeout=60)
        assert all(torch.equal(saved[k], restored[k]) for k in saved)
        assert _step(backend, 2)["step"] == 2


def test_the_queue_bound_frees_a_slot_before_the_future_resolves(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    batch = make_batch(0, batch_size=1, seq_len=4)

    async def await_each(backend: PyTorchTrainingBackend) -> int:
        done = 0
        for _ in range(1000):
            await backend.forward(batch)  # never more than one call pending
            done += 1
        return done

    with _backend(tiny_model_dir, tmp_path, queue_depth_max=1) as backend:
        assert asyncio.run(await_each(backend)) == 1000


def test_rl_with_64_micro_batches_per_step_stays_within_the_queue(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    tokenizer = build_char_tokenizer()
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))
    backend = PyTorchTrainingBackend(
        model, create_adamw_optimizer(model, LR), make_rl_loss("ppo"), tmp_path, "cpu"
    )
    script = [[str(j) if j % 2 else "ab" for j in range(8)]]  # mixed rewards: nothing dropped
    engine = PromptScriptedEngine(tokenizer, script)
    config = RLTrainingConfig(
        num_steps=2, prompts_per_step=8, group_size=8, micro_batch_size=1, eval_every_steps=0
    )
    # 64 forward_backward calls and an optim_step: more than the queue holds at once.
    assert config.prompts_per_step * config.group_size + 1 > backend.queue_depth_max
    with backend:
        history = trio.run(run_rl_training, backend, engine, DigitsTask(8), config, None, tokenizer)
    assert [m["groups_trained"] for m in history] == [8, 8]
    assert all(math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in history)


def test_close_gives_up_after_its_bound_and_names_what_it_dropped() -> None:
    release = threading.Event()
    worker = SerialWorker("slow", close_timeout_s=0.3)
    running = worker.submit("long_call", lambda: release.wait(30))
    dropped = worker.submit("queued_call", lambda: 1)
    start_s = time.perf_counter()
    with pytest.warns(RuntimeWarning, match=r"long_call#1 is still running.*queued_call#2"):
        worker.close()
    assert time.perf_counter() - start_s < 5
    with pytest.raises(BackendFailedError, match="queued_call#2 was dropped, never run"):
        dropped.wait(timeout=5)
    release.set()
    assert running.wait(timeout=10) is True  # the running call finishes on its own


EXIT_SCRIPT = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from rollouts.training import PyTorchTrainingBackend
from rollouts.training.backends import create_adamw_optimizer, create_cross_entropy_loss

torch.manual_seed(0)
config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
model = LlamaForCausalLM(config)
backend = PyTorchTrainingBackend(
    model, create_adamw_optimizer(model, 1e-3), create_cross_entropy_loss(), sys.argv[1], "cpu"
)
ids = torch.randint(0, 256, (8, 64))
for _ in range(3):
    backend.forward_backward({"input_ids": ids, "labels": ids})
    backend.optim_step()
backend.save_checkpoint(3)
print("left without close()", flush=True)
"""


def test_a_script_that_exits_without_close_keeps_its_queued_checkpoint(tmp_path: Path) -> None:
    script = tmp_path / "forgets_close.py"
    script.write_text(textwrap.dedent(EXIT_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "terminate called" not in done.stderr
    assert (tmp_path / "ckpt" / "step_00000003" / "model.safetensors").is_file()
