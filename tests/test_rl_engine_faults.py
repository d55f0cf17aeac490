"""An RL run whose engine process dies or stops mid-run ends with one named error (not a group of
them, not a hang) within seconds of the fault, or within the engine's call bound."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import trio
from _rl_fakes import DigitsTask
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.inference import EngineProcessError, EngineTimeoutError, HFRolloutEngine
from rollouts.rl import RLTrainingConfig, run_rl_training
from rollouts.training import PyTorchTrainingBackend
from rollouts.training.backends import create_adamw_optimizer
from rollouts.training.losses import make_rl_loss

CALL_TIMEOUT_S = 3.0
CONFIG = RLTrainingConfig(
    num_steps=50, prompts_per_step=2, group_size=2, max_tokens=4, eval_every_steps=0,
    async_mode=True, max_steps_off_policy=1,
)  # fmt: skip


class FaultAfterFirstStep:
    """A metrics logger that sends `signum` to the engine's child once the first step is logged."""

    def __init__(self, engine: HFRolloutEngine, signum: int) -> None:
        self.pid, self.signum, self.sent_at_s = engine._child.pid, signum, None

    def log(self, record: dict) -> None:
        if self.sent_at_s is None:
            os.kill(self.pid, self.signum)
            self.sent_at_s = time.perf_counter()


@pytest.fixture(scope="module")
def engines():
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))
    # Both start now, in the background, so their start-ups overlap.
    built = {
        signum: HFRolloutEngine(
            model, tokenizer, call_timeout_s=CALL_TIMEOUT_S, start_timeout_s=120
        )
        for signum in (signal.SIGKILL, signal.SIGSTOP)
    }
    yield model, tokenizer, built
    for engine in built.values():
        child = engine._child
        if child is not None:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child.pid, signum)
        engine.close()


@pytest.mark.parametrize(
    "signum, error, bound_s",
    [(signal.SIGKILL, EngineProcessError, 5.0), (signal.SIGSTOP, EngineTimeoutError, 9.0)],
)
def test_an_engine_fault_ends_the_run_with_one_named_error(
    engines, tmp_path: Path, signum: int, error: type, bound_s: float
) -> None:
    model, tokenizer, built = engines
    engine = built[signum]
    backend = PyTorchTrainingBackend(
        model, create_adamw_optimizer(model, 1e-3), make_rl_loss("ppo"), tmp_path, "cpu"
    )
    logger = FaultAfterFirstStep(engine, signum)
    with backend, pytest.raises(error) as info:
        trio.run(run_rl_training, backend, engine, DigitsTask(4), CONFIG, logger, tokenizer)
    assert logger.sent_at_s is not None, "the run reached its first step"
    assert time.perf_counter() - logger.sent_at_s < bound_s
    message = str(info.value)
    assert f"pid {logger.pid}" in message and ("sample#" in message or "load_weights#" in message)
    if signum == signal.SIGKILL:
        assert "SIGKILL" in message
    else:
        assert f"call_timeout_s={CALL_TIMEOUT_S}" in message
