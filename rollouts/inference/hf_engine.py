"""`HFRolloutEngine`: a Hugging Face causal LM sampling beside the trainer, on its own weights.

The engine owns a deep copy of the model it is given (it never aliases a trainer's parameters) and
samples with `rollouts.inference._sampling.generate`: batched, left-padded, over the KV cache, with
log-probs of the exact distribution sampled from (see `rollouts.inference.protocol`).
`load_weights(weights, version)` takes a `WeightUpdate` (kind "full", or "adapter": a LoRA
backend's A and B per adapted weight, applied as W = W_base + scale * B @ A with the base kept from
the first such update; another kind is refused with ValueError naming it) or a plain state dict,
and copies the tensors before it returns, so
later changes to the caller's dict or to the trainer's live weights never reach the engine: the
engine holds a snapshot.

Where it runs (`mode`):
- "process" (the default): a child process started with torch.multiprocessing ("spawn"), with
  `num_threads` intra-op threads (default 1). A thread of this process sends each call and
  resolves its future when the child answers; the model copy and the tokenizer reach the child
  through a temporary file and shared memory, weights through shared memory (see
  `rollouts.inference._engine_process`). `close()` stops the child (and kills it if it does not
  exit within a bound); a child whose parent dies sees its pipe close and exits. A main script
  that creates a process engine must do so under `if __name__ == "__main__":`: "spawn" re-runs
  the script's module-level code in the child, so the constructor refuses (RuntimeError naming
  the script and line) code that would be re-run.
- "thread": a worker thread of this process, with `num_threads` intra-op threads for that thread
  (torch's OpenMP thread count is per thread).

Bounds and faults (process mode). Every exchange with the child is bounded: start-up (the child
imports torch and transformers, about 6-10 s here) by `start_timeout_s` (default 300 s), each
call by `call_timeout_s` (default 600 s). Then:
- A child that dies (killed, crashed, out of memory) fails the running call at once with
  `EngineProcessError` naming the call and the exit code, e.g. "the engine process (pid 123)
  was killed by SIGKILL (exit code -9) during sample#3; ...". One that dies during start-up is
  named the same way, "during start_process#1, during its start-up"; its own traceback, if any,
  is on the stderr it shares with this process.
- A child that stays alive and does not answer within the bound (stuck, or stopped) fails the call
  with `EngineTimeoutError` (an `EngineProcessError` and a `TimeoutError`) naming the call and
  the bound, and is killed, so nothing is left behind.
- After either, the engine is unusable: the calls queued behind and every later call fail with
  `BackendFailedError` naming the original failure; make a new engine.
- An exception raised by the engine's own code in a healthy child (NaN logits, say) is raised as
  itself, with the child's traceback as a note. A failed `sample` is a refusal: only its future
  fails and the next call runs. A failed `load_weights` (in either mode) leaves the weights
  suspect: later calls fail with `BackendFailedError` until a `load_weights` succeeds.
`close()` and interpreter exit finish the queued calls first (each within its bound), then stop
the child; neither waits without a bound.

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

import atexit
import copy
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from rollouts.core.futures import TrainFuture
from rollouts.core.weights import ADAPTER_SUFFIXES, WeightUpdate, as_weight_update
from rollouts.core.worker import EXIT_CODE_GAVE_UP, QUEUE_DEPTH_MAX_DEFAULT, SerialWorker
from rollouts.inference._engine_process import ChildProcess, EngineProcessError, EngineTimeoutError
from rollouts.inference._main_guard import check_main_guard
from rollouts.inference._sampling import generate
from rollouts.inference.protocol import Completion, SamplingParams

__all__ = [
    "CALL_TIMEOUT_S_DEFAULT",
    "ENGINE_MODES",
    "START_TIMEOUT_S_DEFAULT",
    "EngineProcessError",
    "EngineTimeoutError",
    "HFRolloutEngine",
]

T = TypeVar("T")

ENGINE_MODES = ("process", "thread")
# Generous: a bound that catches a dead or stuck child, not one a slow legitimate call meets.
CALL_TIMEOUT_S_DEFAULT = 600.0
START_TIMEOUT_S_DEFAULT = 300.0
# How long a call's body waits for its own label; submit() sets it right after queueing.
_LABEL_WAIT_S = 10.0
# How long close() waits for the worker thread once the child that a stuck call used is gone.
_WORKER_JOIN_TIMEOUT_S = 10.0
ENGINE_WEIGHT_KINDS = ("full", "adapter")  # the whole state dict; a LoRA adapter's A, B, scale
_RECOVERY_HINTS = {
    "weights": "load_weights(...) with a full set of weights",
    "engine process": "close() this engine and create a new one",
}


@dataclass
class _EngineCore:
    """The model copy and what sampling needs from the tokenizer; runs in a thread or a child."""

    model: nn.Module
    tokenizer: Any
    eos_token_ids: frozenset[int]
    pad_token_id: int
    batch_size_max: int
    weight_version: int
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # adapted ones only

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

    @torch.no_grad()
    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float]]:
        """log p(token i | tokens < i) for i >= 1 of each prompt, one forward per prompt."""
        scored = []
        for prompt in prompts:
            input_ids = torch.tensor([prompt], device=next(self.model.parameters()).device)
            logits = self.model(input_ids=input_ids).logits.float()
            logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
            scored.append(logprobs.gather(1, input_ids[0, 1:, None])[:, 0].tolist())
        return scored

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        # load_state_dict copies into the model's own tensors: nothing of `state_dict` is kept.
        self.model.load_state_dict(state_dict, strict=True)
        self.base_weights = {}  # these are the new base for later adapter updates
        self.weight_version = version

    @torch.no_grad()
    def load_adapter(
        self, tensors: Mapping[str, torch.Tensor], scales: Mapping[str, float], version: int
    ) -> None:
        """Set each adapted weight to W_base + scale * B @ A. The base of a weight is copied
        once, at its first adapter update, so later updates never compound rounding."""
        update = WeightUpdate(tensors=tensors, kind="adapter", scales=scales)
        self._untie_an_adapted_embedding(scales)
        params = dict(self.model.named_parameters())
        for name in scales:
            param = params[name]
            base = self.base_weights.setdefault(name, param.detach().clone())
            delta = update.adapter_delta(name).to(device=param.device, dtype=torch.float32)
            param.copy_((base.float() + delta).to(param.dtype))
        self.weight_version = version

    def _untie_an_adapted_embedding(self, scales: Mapping[str, float]) -> None:
        """A LoRA embedding adapter leaves a tied LM head at its base weight (PEFT adapts the
        input lookup only), so the engine's head gets its own copy before the merge."""
        embedding = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings()
        if head is None or embedding is None or head.weight is not embedding.weight:
            return
        names = {n for n, p in self.model.named_parameters() if p is embedding.weight}
        if names & set(scales):
            head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
            if getattr(self.model, "config", None) is not None:
                self.model.config.tie_word_embeddings = False

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class HFRolloutEngine:
    """A `RolloutEngine` over a Hugging Face causal LM; see the module docstring.

    `model` is copied (deeply) and put in eval mode on `device`; the caller's model is untouched.
    `batch_size_max` bounds the rows decoded together (prompts x samples are split into chunks).
    `call_timeout_s` bounds each call to the child and `start_timeout_s` its start-up (process
    mode; a thread cannot be interrupted, so thread mode has no such bound).
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
        call_timeout_s: float = CALL_TIMEOUT_S_DEFAULT,
        start_timeout_s: float = START_TIMEOUT_S_DEFAULT,
    ) -> None:
        _validate_settings(mode, num_threads, batch_size_max, call_timeout_s, start_timeout_s)
        if mode == "process":
            check_main_guard("HFRolloutEngine(mode='process')")
        self.device = torch.device(device)
        self.mode = mode
        self.call_timeout_s = float(call_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        engine_model = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)
        self._shapes = {name: t.shape for name, t in engine_model.state_dict().items()}
        # An adapter update addresses parameters: a tied weight answers to one name only.
        self._parameter_names = {name for name, _ in engine_model.named_parameters()}
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
            f"HFRolloutEngine[{mode}]",
            queue_depth_max,
            _thread_count_setter(num_threads),
            recovery_hints=_RECOVERY_HINTS,
        )
        self._core: _EngineCore | None = None
        self._child: ChildProcess | None = None
        if mode == "thread":
            self._core = core
            return
        try:
            self._child = ChildProcess(
                core,
                num_threads,
                call_timeout_s=self.call_timeout_s,
                start_timeout_s=self.start_timeout_s,
            )
        except BaseException:
            self._worker.close()
            raise
        _OPEN_PROCESS_ENGINES.add(self)
        # Start-up runs on the worker, in the background of the caller's own set-up; a failure
        # stops the stream, so the first call names it.
        self._submit("start_process", self._start_child)

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
        return self._submit("sample", partial(self._sample, args))

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> TrainFuture[list[list[float]]]:
        """Each prompt's token log-probs under the loaded weights: entry i - 1 scores token i
        given the tokens before it (the first token has none), at temperature 1."""
        prompt_lists = self._validate_prompts(prompts, SamplingParams(max_tokens=1))
        return self._submit("prompt_logprobs", partial(self._prompt_logprobs, prompt_lists))

    def load_weights(
        self, weights: WeightUpdate | Mapping[str, torch.Tensor], version: int
    ) -> TrainFuture[None]:
        """Queue a copy of `weights` (a `WeightUpdate` of kind "full", or a state dict), taken
        now, labelled `version`; see the module docstring for what a failure does."""
        update = as_weight_update(weights)
        if update.kind not in ENGINE_WEIGHT_KINDS:
            raise ValueError(
                f"load_weights: WeightUpdate.kind={update.kind!r}; HFRolloutEngine applies only "
                f"kinds {ENGINE_WEIGHT_KINDS}"
            )
        if update.kind == "adapter":
            self._validate_adapter(update)
        else:
            self._validate_state_dict(update.tensors)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"version must be an int, got {version!r}")
        # The snapshot is taken here, before the call returns: mutating the tensors afterwards
        # (or training the model they came from) cannot reach the engine.
        target = self.device if self.mode == "thread" else torch.device("cpu")
        snapshot = {k: v.detach().to(target, copy=True) for k, v in update.tensors.items()}
        self._version = version
        if update.kind == "adapter":  # the adapted weights only: it repairs nothing else
            args = (snapshot, dict(update.scales), version)
            return self._submit("load_weights", partial(self._load_adapter, args))
        # A full load replaces every tensor, so it also repairs weights a failed load left suspect.
        return self._submit(
            "load_weights", partial(self._load_weights, snapshot, version), recovers=("weights",)
        )

    @property
    def weight_version(self) -> int:
        """The version of the last `load_weights` call (the one the next `sample` will use)."""
        return self._version

    def close(self) -> None:
        """Finish queued calls, stop the worker thread and (process mode) the child process.

        Bounded: the worker's drain by its close timeout (each call by `call_timeout_s`), the
        child's exit by a few seconds before it is killed.
        """
        self._worker.close()
        if self._child is None:
            return
        _OPEN_PROCESS_ENGINES.discard(self)
        # If the drain gave up on a call still exchanging with the child, stop() kills the child
        # rather than touch the pipe under it, which ends that call; then the thread can finish.
        self._child.stop()
        if self._worker.is_alive():
            self._worker.close(timeout_s=_WORKER_JOIN_TIMEOUT_S)

    def __enter__(self) -> HFRolloutEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals: the calls' bodies, run on the worker thread ------------------------------------

    def _submit(
        self, op: str, body: Callable[[str], T], *, recovers: tuple[str, ...] = ()
    ) -> TrainFuture[T]:
        """Queue `body(label)`, where `label` is the call's name in the stream, e.g. "sample#3"."""
        label = _CallLabel(op)
        future = self._worker.submit(op, lambda: body(label.get()), recovers=recovers)
        label.set(future.label)
        return future

    def _start_child(self, label: str) -> None:
        assert self._child is not None, "only a process engine starts a child"
        self._worker.touch("engine process")  # until it is ready, nothing can run on it
        self._child.wait_ready(label)

    def _sample(self, args: tuple[Any, ...], label: str) -> list[list[Completion]]:
        if self._core is not None:
            return self._core.sample(*args)
        return self._call_child(label, "sample", args)

    def _prompt_logprobs(self, prompts: list[list[int]], label: str) -> list[list[float]]:
        if self._core is not None:
            return self._core.prompt_logprobs(prompts)
        return self._call_child(label, "prompt_logprobs", (prompts,))

    def _load_weights(self, snapshot: dict[str, torch.Tensor], version: int, label: str) -> None:
        # From here on a failure may have left some tensors copied and others not.
        self._worker.touch("weights")
        if self._core is not None:
            self._core.load_weights(snapshot, version)
            return
        self._call_child(label, "load_weights", (snapshot, version))

    def _load_adapter(self, args: tuple[Any, ...], label: str) -> None:
        self._worker.touch("weights")
        if self._core is not None:
            self._core.load_adapter(*args)
            return
        self._call_child(label, "load_adapter", args)

    def _call_child(self, label: str, op: str, args: tuple[Any, ...]) -> Any:
        assert self._child is not None, "an engine has a core or a child"
        try:
            return self._child.call(label, op, args)
        except EngineProcessError:
            # The child is gone: whatever it held is lost, and no later call can run.
            self._worker.touch("engine process")
            raise

    # -- internals: validation ---------------------------------------------------------------------

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

    def _validate_adapter(self, update: WeightUpdate) -> None:
        for name in update.scales:
            a, b = (update.tensors[f"{name}{suffix}"] for suffix in ADAPTER_SUFFIXES)
            shape = (b.shape[0], a.shape[1])
            if name not in self._parameter_names or tuple(self._shapes[name]) != shape:
                found = tuple(self._shapes[name]) if name in self._shapes else "no such weight"
                raise ValueError(
                    f"load_weights: the adapter of {name!r} makes a {shape} update, but the "
                    f"engine's model has {found}; was the engine built from the backend's base?"
                )

    def _validate_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(self._shapes.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - self._shapes.keys())
        if missing or unexpected:
            raise ValueError(
                f"load_weights: the weights do not match the engine's model; "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, tensor in state_dict.items():
            if tensor.shape != self._shapes[name]:
                raise ValueError(
                    f"load_weights: {name} has shape {tuple(tensor.shape)}, the engine's model "
                    f"expects {tuple(self._shapes[name])}"
                )


class _CallLabel:
    """A call's label in the worker's stream, known once `submit` returns; the call's body, which
    may start before that, waits for it (briefly: submit returns right after queueing)."""

    def __init__(self, op: str) -> None:
        self._label = op
        self._known = threading.Event()

    def set(self, label: str) -> None:
        self._label = label
        self._known.set()

    def get(self) -> str:
        self._known.wait(_LABEL_WAIT_S)
        return self._label


def _validate_settings(
    mode: str,
    num_threads: int | None,
    batch_size_max: int,
    call_timeout_s: float,
    start_timeout_s: float,
) -> None:
    if mode not in ENGINE_MODES:
        raise ValueError(f"mode={mode!r}; must be one of {ENGINE_MODES}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be None (torch's default) or >= 1, got {num_threads}")
    if batch_size_max < 1:
        raise ValueError(f"batch_size_max must be >= 1, got {batch_size_max}")
    for name, value in (("call_timeout_s", call_timeout_s), ("start_timeout_s", start_timeout_s)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")


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


# -- interpreter exit ------------------------------------------------------------------------------

_OPEN_PROCESS_ENGINES: weakref.WeakSet[HFRolloutEngine] = weakref.WeakSet()


def _close_open_engines_at_exit() -> None:
    """Close every process engine still open: its queued calls finish (as the worker's own exit
    hook would let them), then its child stops.

    Registered after the worker's hook, so it runs first; and after multiprocessing's, which runs
    last and joins daemonic children without a bound, so no child is left for it to wait on.
    """
    engines = list(_OPEN_PROCESS_ENGINES)
    for engine in engines:
        engine.close()
    if any(engine._worker.is_alive() for engine in engines):
        # Mirrors the worker's own hook: never let the interpreter finalise under a running call.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(EXIT_CODE_GAVE_UP)


atexit.register(_close_open_engines_at_exit)
