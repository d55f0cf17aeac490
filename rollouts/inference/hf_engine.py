"""`HFRolloutEngine`: a Hugging Face causal LM sampling beside the trainer, on its own weights.

The engine owns a deep copy of the model it is given (it never aliases a trainer's parameters) and
samples with `rollouts.inference._sampling.generate`: batched, left-padded, over the KV cache, with
log-probs of the exact distribution sampled from (see `rollouts.inference.protocol`).
`load_weights(state_dict, version)` copies the tensors before it returns, so later changes to the
caller's dict or to the trainer's live weights never reach the engine: the engine holds a snapshot.

Where it runs (`mode`):
- "process" (the default): a child process started with torch.multiprocessing ("spawn"), with
  `num_threads` intra-op threads (default 1). A thread of this process sends each call and
  resolves its future when the child answers; weights travel as a state dict through shared
  memory. `close()` stops the child (and terminates it if it does not answer); a child whose
  parent dies sees its pipe close and exits.
- "thread": a worker thread of this process, with `num_threads` intra-op threads for that thread
  (torch's OpenMP thread count is per thread).

Why a process by default: sampling a small model is dominated by Python work per decoding step
(one tiny forward per token), so an engine thread and the trainer's thread take turns on the GIL;
a child process has its own interpreter, and with one intra-op thread it leaves the trainer its
own OpenMP team. `benchmarks/engine_overlap.py` measures both. On the 2-core CPU, with other jobs
using about two cores' worth of the machine throughout (so no setting could get near the 2x
ceiling), four runs of interleaved rounds timed 12 training steps and 6 sampling calls run at
once, engine thread vs engine process (both with 1 intra-op thread): 2.06 vs 2.82 s,
2.86 vs 1.99 s, 2.09 vs 1.67 s, 2.19 vs 2.42 s. Under that load the measurement does not separate
them (two wins each, totals 9.2 vs 8.9 s); the process is the default for the structural reason
above (no shared GIL, no shared OpenMP pool), and `mode="thread"` is there to re-measure on a
quiet machine. What was consistent: a child process with torch's default two intra-op threads
on the loaded machine took 4.6 s and 33 s (two runs) for the sampling that one thread did in about
1.3 s, as an OpenMP team stalls whenever one of its threads is descheduled; hence
`num_threads=1` by default in both modes. The price of a process: its start-up (importing torch
and transformers, about 6 s here, paid once in the background of the caller's own set-up) and
one copy of the weights per `load_weights` through shared memory.
"""

from __future__ import annotations

import contextlib
import copy
import os
import traceback
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rollouts.core.futures import TrainFuture
from rollouts.core.worker import QUEUE_DEPTH_MAX_DEFAULT, SerialWorker
from rollouts.inference._sampling import generate
from rollouts.inference.protocol import Completion, SamplingParams

__all__ = ["ENGINE_MODES", "HFRolloutEngine"]

ENGINE_MODES = ("process", "thread")
_POLL_INTERVAL_S = 0.2
_SHUTDOWN_TIMEOUT_S = 10.0


@dataclass
class _EngineCore:
    """The model copy and what sampling needs from the tokenizer; runs in a thread or a child."""

    model: nn.Module
    tokenizer: Any
    eos_token_ids: frozenset[int]
    pad_token_id: int
    batch_size_max: int
    weight_version: int

    def sample(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seed: int
    ) -> list[list[Completion]]:
        rows = [prompt for prompt in prompts for _ in range(num_samples)]
        # One seed per row, derived from the call's seed: row i's samples depend on (seed, i) only.
        seeder = torch.Generator().manual_seed(seed)
        row_seeds = torch.randint(0, 2**62, (len(rows),), generator=seeder).tolist()
        generated = generate(
            self.model,
            rows,
            params,
            row_seeds,
            decode=self._decode,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            batch_size_max=self.batch_size_max,
        )
        completions = [
            Completion(
                prompt_token_ids=list(prompt),
                token_ids=row.token_ids,
                logprobs=row.logprobs,
                text=row.text,
                finish_reason=row.finish_reason,
                weight_version=self.weight_version,
            )
            for prompt, row in zip(rows, generated, strict=True)
        ]
        return [completions[i : i + num_samples] for i in range(0, len(rows), num_samples)]

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        # load_state_dict copies into the model's own tensors: nothing of `state_dict` is kept.
        self.model.load_state_dict(state_dict, strict=True)
        self.weight_version = version

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class HFRolloutEngine:
    """A `RolloutEngine` over a Hugging Face causal LM; see the module docstring.

    `model` is copied (deeply) and put in eval mode on `device`; the caller's model is untouched.
    `batch_size_max` bounds the rows decoded together (prompts x samples are split into chunks).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        device: str | torch.device = "cpu",
        *,
        mode: str = "process",
        num_threads: int | None = 1,
        batch_size_max: int = 64,
        weight_version: int = 0,
        queue_depth_max: int = QUEUE_DEPTH_MAX_DEFAULT,
    ) -> None:
        if mode not in ENGINE_MODES:
            raise ValueError(f"mode={mode!r}; must be one of {ENGINE_MODES}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(
                f"num_threads must be None (torch's default) or >= 1, got {num_threads}"
            )
        if batch_size_max < 1:
            raise ValueError(f"batch_size_max must be >= 1, got {batch_size_max}")
        self.device = torch.device(device)
        self.mode = mode
        engine_model = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)
        self._shapes = {name: t.shape for name, t in engine_model.state_dict().items()}
        config = getattr(engine_model, "config", None)
        self._vocab_size: int | None = getattr(config, "vocab_size", None)
        self._max_positions: int | None = getattr(config, "max_position_embeddings", None)
        core = _EngineCore(
            model=engine_model,
            tokenizer=tokenizer,
            eos_token_ids=_eos_token_ids(engine_model, tokenizer),
            pad_token_id=_pad_token_id(tokenizer),
            batch_size_max=batch_size_max,
            weight_version=weight_version,
        )
        self._version = weight_version
        self._worker = SerialWorker(
            f"HFRolloutEngine[{mode}]", queue_depth_max, _thread_count_setter(num_threads)
        )
        self._core: _EngineCore | None = None
        self._child: _ChildProcess | None = None
        if mode == "thread":
            self._core = core
        else:
            self._child = _ChildProcess(core, num_threads)
            self._worker.submit("start_process", self._child.wait_ready)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any
    ) -> HFRolloutEngine:
        """An engine over the model and tokenizer saved (`save_pretrained`) in `path`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return cls(model, AutoTokenizer.from_pretrained(path), device, **kwargs)

    # -- the protocol ------------------------------------------------------------------------------

    def sample(
        self, prompts: Sequence[Sequence[int]], num_samples: int, params: SamplingParams
    ) -> TrainFuture[list[list[Completion]]]:
        prompt_lists = self._validate_prompts(prompts, params)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        # Drawn now, on the caller's side, so that the call is fully described when queued.
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        args = (prompt_lists, num_samples, params, seed)
        return self._worker.submit("sample", lambda: self._run("sample", args))

    def load_weights(
        self, state_dict: Mapping[str, torch.Tensor], version: int
    ) -> TrainFuture[None]:
        self._validate_state_dict(state_dict)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"version must be an int, got {version!r}")
        # The snapshot is taken here, before the call returns: mutating `state_dict` afterwards
        # (or training the model it came from) cannot reach the engine.
        target = self.device if self.mode == "thread" else torch.device("cpu")
        snapshot = {k: v.detach().to(target, copy=True) for k, v in state_dict.items()}
        self._version = version
        return self._worker.submit(
            "load_weights", lambda: self._run("load_weights", (snapshot, version))
        )

    @property
    def weight_version(self) -> int:
        """The version of the last `load_weights` call (the one the next `sample` will use)."""
        return self._version

    def close(self) -> None:
        """Finish queued calls, stop the worker thread and (process mode) the child process."""
        self._worker.close()
        if self._child is not None:
            self._child.shutdown()

    def __enter__(self) -> HFRolloutEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------

    def _run(self, op: str, args: tuple[Any, ...]) -> Any:
        if self._core is not None:
            return getattr(self._core, op)(*args)
        assert self._child is not None, "an engine has a core or a child"
        return self._child.call(op, args)

    def _validate_prompts(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[int]]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty sequence of token-id sequences")
        prompt_lists = []
        for index, prompt in enumerate(prompts):
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError(f"prompts[{index}] is empty; a prompt needs at least one token")
            bad = [
                t for t in ids if t < 0 or (self._vocab_size is not None and t >= self._vocab_size)
            ]
            if bad:
                raise ValueError(
                    f"prompts[{index}] holds token ids {bad[:5]} outside [0, {self._vocab_size})"
                )
            if (
                self._max_positions is not None
                and len(ids) + params.max_tokens > self._max_positions
            ):
                raise ValueError(
                    f"prompts[{index}] has {len(ids)} tokens; with max_tokens={params.max_tokens} "
                    f"that exceeds the model's max_position_embeddings={self._max_positions}"
                )
            prompt_lists.append(ids)
        return prompt_lists

    def _validate_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(self._shapes.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - self._shapes.keys())
        if missing or unexpected:
            raise ValueError(
                f"load_weights: state_dict does not match the engine's model; "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, tensor in state_dict.items():
            if tensor.shape != self._shapes[name]:
                raise ValueError(
                    f"load_weights: {name} has shape {tuple(tensor.shape)}, the engine's model "
                    f"expects {tuple(self._shapes[name])}"
                )


def _thread_count_setter(num_threads: int | None) -> Any:
    if num_threads is None:
        return None
    return lambda: torch.set_num_threads(num_threads)


def _eos_token_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(t) for t in configured)
    return frozenset(ids)


def _pad_token_id(tokenizer: Any) -> int:
    # The pad id only fills left padding (masked out) and finished rows (ignored): any id works.
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


# -- process mode ---------------------------------------------------------------------------------


class _ChildProcess:
    """The engine's child process and the parent's end of its pipe (used by one worker thread)."""

    def __init__(self, core: _EngineCore, num_threads: int | None) -> None:
        context = torch.multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(
            target=_serve, args=(child_conn, core, num_threads), name="HFRolloutEngine", daemon=True
        )
        self._process.start()
        child_conn.close()
        # Ends the child even if close() is never called (garbage collection or interpreter exit).
        self._finalizer = weakref.finalize(self, _stop_process, self._process, self._conn)

    def wait_ready(self) -> None:
        self._receive("start")

    def call(self, op: str, args: tuple[Any, ...]) -> Any:
        self._conn.send((op, args))
        return self._receive(op)

    def shutdown(self) -> None:
        self._finalizer()

    def _receive(self, op: str) -> Any:
        while not self._conn.poll(_POLL_INTERVAL_S):
            if not self._process.is_alive():
                raise RuntimeError(
                    f"the engine process exited (code {self._process.exitcode}) during {op}"
                )
        status, payload, child_traceback = self._conn.recv()
        if status == "error":
            payload.add_note(f"raised in the engine process during {op}:\n{child_traceback}")
            raise payload
        return payload


def _stop_process(process: Any, conn: Connection) -> None:
    # OSError/ValueError: the pipe is already closed, so the child is gone or going.
    with contextlib.suppress(OSError, ValueError):
        conn.send(("close", ()))
    process.join(_SHUTDOWN_TIMEOUT_S)
    if process.is_alive():
        process.terminate()
        process.join(_SHUTDOWN_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()


def _serve(conn: Connection, core: _EngineCore, num_threads: int | None) -> None:
    """The child's loop: answer (op, args) messages until "close" or the parent's pipe closes."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    conn.send(("ok", None, ""))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        if op == "close":
            return
        try:
            result = getattr(core, op)(*args)
        except Exception as error:
            conn.send(("error", _picklable(error), traceback.format_exc()))
            continue
        conn.send(("ok", result, ""))


def _picklable(error: Exception) -> Exception:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
