"""HFRolloutEngine's child process under faults: killed or stopped while serving or starting up,
spawned from a script without the main guard, and started with a payload larger than a pipe
buffer.

Each fault must be named (the call, the exit code or the bound) within seconds, leave no process
behind, and stop the engine's stream; nothing may hang. The slow starts (two engines broken on
purpose, two script runs) begin together in one fixture, which keeps the file short on two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_inference import PROMPTS, TOKENIZER, build_model

from rollouts.core.futures import TrainFuture
from rollouts.inference import HFRolloutEngine, SamplingParams
from rollouts.inference.hf_engine import EngineProcessError, EngineTimeoutError
from rollouts.training import BackendFailedError

PARAMS = SamplingParams(max_tokens=4, seed=0)
STOPPED_CALL_TIMEOUT_S = 3.0
# Slack for a loaded 2-core machine: a fault must be named well within this.
NAMED_WITHIN_S = 5.0
START_WAIT_S = 120.0


# The body of a user's script: a tiny model, and a tokenizer padded with words the model never
# samples so that it pickles to several pipe buffers (64 KiB each); process and thread engines
# must sample the same completions.
SCRIPT_HEADER = """\
import pickle

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rollouts.inference import HFRolloutEngine, SamplingParams


def build_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    model_vocab_size = len(vocab)
    for index in range(20000):
        vocab[f"padding-word-{index}"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    return fast, model_vocab_size


"""
SCRIPT_BODY = """\
tokenizer, vocab_size = build_tokenizer()
payload_bytes = len(pickle.dumps(tokenizer))
assert payload_bytes > 4 * 65536, payload_bytes
torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=64,
    eos_token_id=1, bos_token_id=1, pad_token_id=0,
)
model = LlamaForCausalLM(config).eval()
prompts = [tokenizer.encode("hello"), tokenizer.encode("2+3=")]
params = SamplingParams(max_tokens=6, seed=3)
engine = HFRolloutEngine(model, tokenizer, start_timeout_s=120)
with HFRolloutEngine(model, tokenizer, mode="thread") as reference:
    expected = reference.sample(prompts, 2, params).wait(timeout=60)
completions = engine.sample(prompts, 2, params).wait(timeout=120)
engine.close()
assert completions == expected, (completions, expected)
print(f"sampled {len(completions)} prompts with a {payload_bytes}-byte tokenizer")
"""


@dataclass
class Started:
    """What the slow tests use, started together so that their start-ups overlap."""

    engines: dict[str, HFRolloutEngine]  # one per fault test; each test breaks its own
    scripts: dict[str, Path]  # "guarded", "unguarded"
    runs: dict[str, subprocess.Popen[str]]


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    """Two process engines and two script runs, all started at once: each imports torch and
    transformers (seconds of CPU), which on two cores is most of this file's time."""
    folder = tmp_path_factory.mktemp("scripts")
    scripts = {"unguarded": folder / "unguarded.py", "guarded": folder / "guarded.py"}
    scripts["unguarded"].write_text(SCRIPT_HEADER + SCRIPT_BODY)
    scripts["guarded"].write_text(
        SCRIPT_HEADER + 'if __name__ == "__main__":\n' + textwrap.indent(SCRIPT_BODY, "    ")
    )
    runs = {
        name: subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=folder,
        )
        for name, script in scripts.items()
    }
    model = build_model()
    engines = {
        "killed": HFRolloutEngine(model, TOKENIZER),
        "stopped": HFRolloutEngine(model, TOKENIZER, call_timeout_s=STOPPED_CALL_TIMEOUT_S),
    }
    yield Started(engines, scripts, runs)
    for engine in engines.values():
        engine.close()
    for run in runs.values():
        run.kill()
        run.communicate(timeout=30)


def child_pid(engine: HFRolloutEngine) -> int:
    assert engine._child is not None, "a process engine has a child"
    return engine._child.pid


def awaited(future: TrainFuture[Any], timeout_s: float) -> Any:
    """The call's result, awaited under asyncio; its exception as raised by the engine.

    Not `future.wait()`: it reports any TimeoutError, a call's own included, as its wait running
    out, which would hide the `EngineTimeoutError` this file checks.
    """
    return asyncio.run(asyncio.wait_for(future.result(), timeout_s))


def release(engine: HFRolloutEngine) -> None:
    """Continue and kill the engine's child if it still runs: no stopped process may outlive a
    test. Asked of the process object first, as a reaped child's pid may be another's by now."""
    child = engine._child
    if child is not None and child.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGCONT)
            os.kill(child.pid, signal.SIGKILL)


def timed_close(engine: HFRolloutEngine) -> float:
    start_s = time.monotonic()
    engine.close()
    return time.monotonic() - start_s


def test_a_killed_engine_process_is_named_and_stops_the_stream(started: Started) -> None:
    engine = started.engines["killed"]
    assert engine.sample(PROMPTS, 1, PARAMS).wait(timeout=START_WAIT_S)  # up and serving
    pid = child_pid(engine)
    pending = engine.sample(PROMPTS, 2, SamplingParams(max_tokens=200, seed=1))
    os.kill(pid, signal.SIGKILL)  # while (or just before) the child serves that call
    start_s = time.monotonic()
    with pytest.raises(EngineProcessError) as raised:
        pending.wait(timeout=30)
    elapsed_s = time.monotonic() - start_s
    assert elapsed_s < NAMED_WITHIN_S, f"named after {elapsed_s:.1f} s"
    message = str(raised.value)
    assert f"(pid {pid})" in message
    assert pending.label in message
    assert "SIGKILL (exit code -9)" in message
    assert not isinstance(raised.value, TimeoutError)
    with pytest.raises(BackendFailedError, match=rf"{pending.label} raised EngineProcessError"):
        engine.sample(PROMPTS, 1, PARAMS)
    with pytest.raises(BackendFailedError, match="SIGKILL"):
        engine.load_weights(build_model().state_dict(), 1)
    assert timed_close(engine) < NAMED_WITHIN_S


def test_a_stopped_engine_process_times_out_and_is_killed(started: Started) -> None:
    engine = started.engines["stopped"]
    assert engine.sample(PROMPTS, 1, PARAMS).wait(timeout=START_WAIT_S)  # up and serving
    pid = child_pid(engine)
    os.kill(pid, signal.SIGSTOP)
    try:
        start_s = time.monotonic()
        stuck = engine.sample(PROMPTS, 1, PARAMS)
        with pytest.raises(EngineTimeoutError) as raised:
            awaited(stuck, timeout_s=30)
        elapsed_s = time.monotonic() - start_s
        assert STOPPED_CALL_TIMEOUT_S <= elapsed_s < STOPPED_CALL_TIMEOUT_S + NAMED_WITHIN_S
        assert isinstance(raised.value, TimeoutError)
        assert stuck.label in str(raised.value)
        assert f"call_timeout_s={STOPPED_CALL_TIMEOUT_S} s" in str(raised.value)
        assert not engine._child.is_alive()
        with pytest.raises(BackendFailedError, match="EngineTimeoutError"):
            engine.sample(PROMPTS, 1, PARAMS)
        assert timed_close(engine) < NAMED_WITHIN_S
    finally:
        release(engine)


def test_an_engine_process_that_dies_at_start_up_is_named() -> None:
    engine = HFRolloutEngine(build_model(), TOKENIZER)
    pid = child_pid(engine)
    os.kill(pid, signal.SIGKILL)  # long before it has imported torch
    try:
        start_s = time.monotonic()
        with pytest.raises(BackendFailedError) as raised:
            engine.sample(PROMPTS, 1, PARAMS).wait(timeout=30)  # queued behind the start-up
        assert time.monotonic() - start_s < NAMED_WITHIN_S
        message = str(raised.value)
        assert "start_process#1 raised EngineProcessError" in message
        assert f"(pid {pid}) was killed by SIGKILL (exit code -9)" in message
        assert "during its start-up" in message and "stderr" in message
        with pytest.raises(BackendFailedError, match="start_process#1"):
            engine.sample(PROMPTS, 1, PARAMS)
    finally:
        assert timed_close(engine) < NAMED_WITHIN_S


def test_an_engine_process_stuck_at_start_up_times_out_and_is_killed() -> None:
    start_timeout_s = 2.0
    engine = HFRolloutEngine(build_model(), TOKENIZER, start_timeout_s=start_timeout_s)
    pid = child_pid(engine)
    os.kill(pid, signal.SIGSTOP)
    try:
        start_s = time.monotonic()
        with pytest.raises(BackendFailedError) as raised:
            engine.sample(PROMPTS, 1, PARAMS).wait(timeout=30)
        assert time.monotonic() - start_s < start_timeout_s + NAMED_WITHIN_S
        message = str(raised.value)
        assert "start_process#1 raised EngineTimeoutError" in message
        assert "did not finish its start-up (start_process#1) within start_timeout_s=2.0 s" in (
            message
        )
        assert not engine._child.is_alive()
        assert timed_close(engine) < NAMED_WITHIN_S
    finally:
        release(engine)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"call_timeout_s": 0}, r"call_timeout_s must be a finite number of seconds > 0, got 0"),
        ({"call_timeout_s": -1.0}, r"call_timeout_s must be .* > 0, got -1.0"),
        ({"call_timeout_s": float("inf")}, r"call_timeout_s must be a finite .* got inf"),
        ({"call_timeout_s": "60"}, r"call_timeout_s must be .* got '60'"),
        ({"start_timeout_s": 0.0}, r"start_timeout_s must be .* > 0, got 0.0"),
        ({"start_timeout_s": float("nan")}, r"start_timeout_s must be .* got nan"),
    ],
)
def test_bad_bounds_are_refused_naming_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HFRolloutEngine(build_model(), TOKENIZER, **kwargs)


def test_a_script_without_the_main_guard_is_refused_and_with_it_samples(
    started: Started,
) -> None:
    outputs = {name: run.communicate(timeout=120) for name, run in started.runs.items()}
    engine_line = 1 + (SCRIPT_HEADER + SCRIPT_BODY).splitlines().index(
        "engine = HFRolloutEngine(model, tokenizer, start_timeout_s=120)"
    )
    _, unguarded_stderr = outputs["unguarded"]
    assert started.runs["unguarded"].returncode != 0
    assert f"{started.scripts['unguarded']}, line {engine_line}" in unguarded_stderr
    assert 'if __name__ == "__main__":' in unguarded_stderr
    assert 'mode="thread"' in unguarded_stderr
    guarded_stdout, guarded_stderr = outputs["guarded"]
    assert started.runs["guarded"].returncode == 0, guarded_stderr
    assert "sampled 2 prompts" in guarded_stdout
