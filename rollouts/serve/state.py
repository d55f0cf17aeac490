"""What `rollouts serve` holds: sessions, trained models (each a `TrainingBackend`), sampler
snapshots and the futures a client polls, with the Tinker API's semantics and no HTTP in sight.

- A model's calls carry `seq_id` 1, 2, ... and run in that order, whatever order they arrive in
  (a chunked `forward_backward` may send its first chunk last); a retried call re-sends its
  `seq_id` and gets the future it already has.
- Each call's work runs on the model's own queue; its result (JSON, protobuf bytes, or an error
  with a category) waits in `Futures` until the client collects it.
- A sampler serves the weights of one save, forever: named saves are written to disk under the
  server's root (and outlive the server), unnamed ones live in memory (the last few).
- One model's failure is its own: an error fails that call's future and nothing else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rollouts.core.weights import WeightUpdate
from rollouts.inference import HFRolloutEngine, SamplingParams
from rollouts.serve.wire import (
    ForwardBackwardCall,
    encode_forward_backward_output,
    encode_sample_response,
)
from rollouts.training.backends import AdamSettings, create_pytorch_backend, load_hf_model
from rollouts.training.losses import (
    IGNORE_INDEX,
    LossFn,
    make_cispo_loss,
    make_cross_entropy_loss,
    make_dro_loss,
    make_importance_sampling_loss,
    make_ppo_loss,
)

__all__ = ["ServeError", "ServerState"]

_log = logging.getLogger("rollouts.serve")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:=-]{0,199}$")  # no '/', no leading '.'
UNNAMED_SNAPSHOTS_KEPT = 8  # unnamed sampler snapshots held in memory; older ones are dropped
FUTURES_KEPT = 10_000  # finished futures kept for a client to collect
SEQ_IDS_KEPT = 4_096  # the latest seq_ids of a model whose retry still gets its future
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
Result = tuple[str, Any]  # ("json", dict) | ("proto", bytes) | ("error", (message, category))
Work = Callable[["TrainedModel"], Awaitable[Result]]


class ServeError(Exception):
    """A request the server refuses: `status` for a submission, `category` for a future."""

    def __init__(self, message: str, status: int = 400, category: str = "user") -> None:
        super().__init__(message)
        self.status, self.category = status, category


def check_name(kind: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ServeError(
            f"{kind} {value!r}: expected 1-200 characters of letters, digits and _.:=- "
            "(no '/', not starting with '.')"
        )
    return value


class Futures:
    """request_id -> the call's eventual result; a bounded number of finished ones is kept."""

    def __init__(self) -> None:
        self._futures: OrderedDict[str, asyncio.Future[Result]] = OrderedDict()
        self._running: set[asyncio.Task[None]] = set()

    def create(self) -> tuple[str, asyncio.Future[Result]]:
        request_id = f"req-{uuid.uuid4().hex}"
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._futures[request_id] = future
        while len(self._futures) > FUTURES_KEPT:
            oldest, dropped = next(iter(self._futures.items()))
            if not dropped.done():
                break  # never drop a pending call
            del self._futures[oldest]
        return request_id, future

    def start(self, work: Callable[[], Awaitable[Result]]) -> str:
        """Run `work` now (not in any model's order) and return its request id."""
        request_id, future = self.create()
        task = asyncio.ensure_future(settle(future, work))
        self._running.add(task)  # a reference until it is done, so it is not collected
        task.add_done_callback(self._running.discard)
        return request_id

    async def wait(self, request_id: str, hold_s: float) -> Result | None:
        """The result, or None if it is not ready within `hold_s` (the client polls again)."""
        future = self._futures.get(request_id)
        if future is None:
            raise ServeError(f"unknown request_id {request_id!r}", status=404)
        try:
            return await asyncio.wait_for(asyncio.shield(future), hold_s)
        except TimeoutError:
            return None


async def settle(future: asyncio.Future[Result], work: Callable[[], Awaitable[Result]]) -> None:
    """Run `work` and put its result, or its error with a category, in `future`."""
    try:
        result = await work()
    except ServeError as error:
        result = ("error", (str(error), error.category))
    except (ValueError, TypeError) as error:  # the protocol's answer to a bad call
        result = ("error", (f"{type(error).__name__}: {error}", "user"))
    except Exception as error:  # the server's own failure; the client sees its message
        _log.exception("a call failed")
        result = ("error", (f"{type(error).__name__}: {error}", "server"))
    if not future.done():
        future.set_result(result)


@dataclass
class TrainedModel:
    """One training client's model: a backend fed by an in-order queue of calls."""

    model_id: str
    run_dir: Path
    lora_rank: int
    backend: Any
    next_seq: int = 1
    requests: dict[int, str] = field(default_factory=dict)  # seq_id -> request id
    waiting: dict[int, tuple[asyncio.Future[Result], Callable[[], Awaitable[Result]]]] = field(
        default_factory=dict
    )
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    saves: int = 0  # checkpoints written, for their temporary step numbers
    task: asyncio.Task[None] | None = None  # the loop running its calls
    running: asyncio.Future[Result] | None = None  # the call it runs now

    def submit(
        self, futures: Futures, seq_id: int, work: Callable[[], Awaitable[Result]], limit: int
    ) -> str:
        """The request id of call `seq_id` (a retry gets the same); queue it when its turn comes."""
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 1:
            raise ServeError(f"seq_id {seq_id!r}: must be an int >= 1")
        if seq_id in self.requests:
            return self.requests[seq_id]
        if seq_id < self.next_seq:
            raise ServeError(f"{self.model_id}: seq_id {seq_id} was already run", status=409)
        ahead = len(self.waiting) + self.queue.qsize()
        if seq_id != self.next_seq and ahead >= limit:  # the call that fills the gap always fits
            raise ServeError(
                f"{self.model_id}: {ahead} calls are queued or wait for seq_id {self.next_seq}; "
                f"at most {limit} may be",
                status=429,
            )
        request_id, future = futures.create()
        self.requests[seq_id] = request_id
        self.waiting[seq_id] = (future, work)
        while self.next_seq in self.waiting:
            self.queue.put_nowait(self.waiting.pop(self.next_seq))
            self.next_seq += 1
        if len(self.requests) > 2 * SEQ_IDS_KEPT:  # a retry comes soon, or never
            oldest_kept = self.next_seq - SEQ_IDS_KEPT
            self.requests = {k: v for k, v in self.requests.items() if k >= oldest_kept}
        return request_id

    async def serve(self) -> None:
        """Run the queued calls one at a time, in seq_id order."""
        while True:
            self.running, work = await self.queue.get()
            await settle(self.running, work)


class ServerState:
    """Everything the HTTP layer calls; see the module docstring."""

    def __init__(
        self,
        model_dir: str,
        model_name: str,
        root: Path,
        device_type: str = "cpu",
        queue_limit: int = 64,
        num_threads: int | None = None,
    ) -> None:
        self.model_dir, self.model_name, self.root = model_dir, model_name, root
        self.device_type, self.queue_limit, self.num_threads = device_type, queue_limit, num_threads
        self.futures = Futures()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.models: dict[str, TrainedModel] = {}
        self.creations: dict[str, str] = {}  # model id -> the request id that builds it
        self.samplers: dict[str, str] = {}  # sampling session id -> snapshot key
        self.unnamed: OrderedDict[str, WeightUpdate] = OrderedDict()
        self._engine: HFRolloutEngine | None = None
        self._loaded = ""  # the snapshot key the engine holds now
        self._loaded_kind = "base"  # "base", or the kind of that snapshot
        self._sample_lock = asyncio.Lock()
        # torch's global random generator is one per process: a LoRA build draws its adapters
        # from it under a fixed seed and a checkpoint load restores it, so two of these at once
        # (a client that creates its next model before the last is ready) would interleave and
        # give a model other adapters than its seed says. They take turns.
        self._rng_lock = asyncio.Lock()
        root.mkdir(parents=True, exist_ok=True)

    # -- sessions --------------------------------------------------------------------------------

    def create_session(self, body: dict[str, Any]) -> dict[str, Any]:
        session_id = f"sess-{uuid.uuid4().hex[:16]}"
        self.sessions[session_id] = {"tags": body.get("tags", []), "sampling_seq": 0}
        return {"session_id": session_id, "type": "create_session"}

    def session(self, session_id: Any) -> dict[str, Any]:
        found = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if found is None:
            raise ServeError(f"unknown session_id {session_id!r}", status=404)
        return found

    def base_model(self, name: Any) -> None:
        served = {self.model_name, self.model_dir, str(Path(self.model_dir).resolve())}
        if name not in served:
            raise ServeError(f"base_model {name!r}: this server serves {self.model_name!r}")

    # -- models ----------------------------------------------------------------------------------

    def create_model(self, body: dict[str, Any]) -> str:
        session_id = body.get("session_id")
        self.session(session_id)
        self.base_model(body.get("base_model"))
        model_id = new_model_id(body)
        if model_id in self.creations:  # a retried create gets the future it already has
            return self.creations[model_id]
        options = lora_options(body.get("lora_config") or {})
        answer = {"model_id": model_id, "type": "create_model"}
        return self._create(model_id, lambda: self._build_model(model_id, options, None, True,
                                                                answer))  # fmt: skip

    def _create(self, model_id: str, build: Callable[[], Awaitable[Result]]) -> str:
        request_id = self.futures.start(build)
        self.creations[model_id] = request_id
        return request_id

    def load_into_new_model(self, body: dict[str, Any]) -> str:
        """`create_training_client_from_state`: a new model from a saved state."""
        session_id = body.get("session_id")
        self.session(session_id)
        model_id = new_model_id(body)
        if model_id in self.creations:
            return self.creations[model_id]
        source = self.weights_dir(body.get("path"), "weights")
        record = source.parent.parent / "run.json"
        if not record.is_file():
            raise ServeError(f"{body['path']}: its run record is missing on this server", 404)
        options = json.loads(record.read_text())["options"]
        optimizer = bool(body.get("optimizer", False))
        answer = {"model_id": model_id, "path": body["path"], "type": "load_weights"}
        return self._create(model_id, lambda: self._build_model(model_id, options, source,
                                                                optimizer, answer))  # fmt: skip

    async def _build_model(
        self,
        model_id: str,
        options: dict[str, Any],
        state: Path | None,
        optimizer: bool,
        answer: dict[str, Any],
    ) -> Result:
        run_dir = self.root / "runs" / model_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps({"base_model": self.model_name,
                                                      "options": options}))  # fmt: skip
        async with self._rng_lock:
            backend = await asyncio.to_thread(
                create_pytorch_backend, self.model_dir, run_dir / "checkpoints",
                device_type=self.device_type, normalization="sum", max_grad_norm=None,
                learning_rate=1e-4, num_threads=self.num_threads, **options,
            )  # fmt: skip
            model = TrainedModel(model_id, run_dir, int(options.get("lora_rank", 0)), backend)
            try:
                if state is not None:
                    await load_state(model, state, optimizer)
                if model_id.split(":train:")[0] not in self.sessions:
                    raise ServeError(f"{model_id}: its session finished while it was built")
            except BaseException:
                await asyncio.to_thread(backend.close)
                raise
        self.models[model_id] = model
        model.task = asyncio.ensure_future(model.serve())
        return ("json", answer)

    def model(self, model_id: Any) -> TrainedModel:
        found = self.models.get(model_id) if isinstance(model_id, str) else None
        if found is None:
            raise ServeError(f"unknown model_id {model_id!r}", status=404)
        return found

    def info(self, model_id: Any) -> dict[str, Any]:
        model = self.model(model_id)
        return {
            "type": "get_info",
            "model_id": model.model_id,
            "model_data": {"arch": "causal_lm", "model_name": self.model_name,
                           "tokenizer_id": self.model_name},
            "is_lora": model.lora_rank > 0,
            "lora_rank": model.lora_rank or None,
        }  # fmt: skip

    def submit(self, model_id: Any, seq_id: Any, prepare: Callable[[], Work]) -> str:
        """Queue a model's call: `prepare` checks the request and returns its work. A request
        it refuses still takes its turn (its future fails), so the later seq_ids are not held
        up waiting for one that never comes."""
        model = self.model(model_id)
        try:
            work = prepare()
        except (ServeError, ValueError, TypeError, AttributeError, KeyError) as error:
            refused = error if isinstance(error, ServeError) else ServeError(f"{error!r}")

            async def work(_model: TrainedModel) -> Result:
                raise refused

        return model.submit(self.futures, seq_id, lambda: work(model), self.queue_limit)

    # -- the training calls' work, run in each model's order -------------------------------------

    def forward_backward(self, call: ForwardBackwardCall) -> str:
        def prepare() -> Work:
            loss_fn = make_tinker_loss(call.loss_fn, call.loss_config)  # a bad name: user error
            batch, lengths = tinker_batch(call)

            async def work(model: TrainedModel) -> Result:
                if call.forward_only:
                    stats = await model.backend.forward(batch, loss_fn=loss_fn)
                else:
                    stats = await model.backend.forward_backward(
                        batch, loss_fn=loss_fn, return_logprobs=True
                    )
                logprobs = stats["logprobs"].numpy()
                outputs = [{"logprobs": logprobs[i, :n]} for i, n in enumerate(lengths)]
                loss_sum = float(stats["loss"]) * float(stats["token_weight"])
                return ("proto", encode_forward_backward_output(outputs, {"loss:sum": loss_sum}))

            return work

        return self.submit(call.model_id, call.seq_id, prepare)

    def optim_step(self, body: dict[str, Any]) -> str:
        def prepare() -> Work:
            adam = adam_settings(body.get("adam_params"))

            async def work(model: TrainedModel) -> Result:
                step = await model.backend.optim_step(adam=adam)
                return ("json", {"metrics": {"grad_norm": float(step["grad_norm"]),
                                             "learning_rate": float(step["lr"])}})  # fmt: skip

            return work

        return self.submit(body.get("model_id"), body.get("seq_id"), prepare)

    def save_weights(self, body: dict[str, Any]) -> str:
        def prepare() -> Work:
            name = check_name("path", body.get("path"))
            overwrite = bool(body.get("overwrite", False))

            async def work(model: TrainedModel) -> Result:
                target = model.run_dir / "weights" / name
                if target.exists() and not overwrite:
                    raise ServeError(f"a state named {name!r} exists; pass overwrite=True")
                model.saves += 1
                written = await model.backend.save_checkpoint(model.saves)
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    shutil.rmtree(target)
                written.rename(target)  # same file system: atomic
                return ("json", {"path": f"tinker://{model.model_id}/weights/{name}",
                                 "type": "save_weights"})  # fmt: skip

            return work

        return self.submit(body.get("model_id"), body.get("seq_id"), prepare)

    def load_weights(self, body: dict[str, Any]) -> str:
        if body.get("model_id") is None:  # the create-from-state form
            return self.load_into_new_model(body)

        def prepare() -> Work:
            source = self.weights_dir(body.get("path"), "weights")
            optimizer = bool(body.get("optimizer", False))

            async def work(model: TrainedModel) -> Result:
                async with self._rng_lock:
                    await load_state(model, source, optimizer)
                return ("json", {"path": body["path"], "type": "load_weights"})

            return work

        return self.submit(body.get("model_id"), body.get("seq_id"), prepare)

    def save_weights_for_sampler(self, body: dict[str, Any]) -> str:
        def prepare() -> Work:
            name = body.get("path")
            if name is not None:
                check_name("path", name)
            elif body.get("sampling_session_seq_id") is None:
                raise ServeError(
                    "save_weights_for_sampler: give a path (name) or a sampling seq id"
                )

            async def work(model: TrainedModel) -> Result:
                update = await model.backend.sampler_weights()
                if name is None:  # an unnamed save: a sampling session on an in-memory snapshot
                    key = f"memory:{model.model_id}:{uuid.uuid4().hex[:8]}"
                    self.unnamed[key] = update
                    while len(self.unnamed) > UNNAMED_SNAPSHOTS_KEPT:
                        self.unnamed.popitem(last=False)
                    session_id = model.model_id.split(":train:")[0]
                    sampler = self.new_sampler(session_id, key)
                    return ("json", {"path": None, "sampling_session_id": sampler,
                                     "type": "save_weights_for_sampler"})  # fmt: skip
                target = model.run_dir / "sampler_weights" / name
                await asyncio.to_thread(write_snapshot, update, target)
                if self._loaded == str(target):  # rewritten: the engine's copy is stale
                    self._loaded = ""
                return ("json", {"path": f"tinker://{model.model_id}/sampler_weights/{name}",
                                 "type": "save_weights_for_sampler"})  # fmt: skip

            return work

        return self.submit(body.get("model_id"), body.get("seq_id"), prepare)

    # -- paths -----------------------------------------------------------------------------------

    def weights_dir(self, path: Any, kind: str) -> Path:
        """The directory of `tinker://MODEL_ID/KIND/NAME`; it must exist."""
        prefix = "tinker://"
        parts = path[len(prefix) :].split("/") if isinstance(path, str) else []
        if not (isinstance(path, str) and path.startswith(prefix) and len(parts) == 3):
            raise ServeError(f"path {path!r}: expected tinker://MODEL_ID/{kind}/NAME")
        model_id, found_kind, name = parts
        check_name("model id", model_id)
        check_name("name", name)
        if found_kind != kind:
            raise ServeError(f"path {path!r}: a {found_kind} path where {kind} was expected")
        directory = self.root / "runs" / model_id / kind / name
        if not directory.is_dir():
            raise ServeError(f"path {path!r}: no such saved {kind} on this server", status=404)
        return directory

    # -- sampling --------------------------------------------------------------------------------

    def new_sampler(self, session_id: str, key: str) -> str:
        session = self.session(session_id)
        sampler = f"{session_id}:sample:{session['sampling_seq']}"
        session["sampling_seq"] += 1
        self.samplers[sampler] = key
        return sampler

    def create_sampling_session(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("model_path"):
            key = str(self.weights_dir(body["model_path"], "sampler_weights"))
        else:
            self.base_model(body.get("base_model"))
            key = "base"
        sampler = self.new_sampler(body.get("session_id"), key)
        return {"sampling_session_id": sampler, "type": "create_sampling_session"}

    def sampler_info(self, sampler: str) -> dict[str, Any]:
        if sampler not in self.samplers:
            raise ServeError(f"unknown sampling session {sampler!r}", status=404)
        return {"sampler_id": sampler, "base_model": self.model_name}

    def sample(self, body: dict[str, Any]) -> tuple[str, list[str]]:
        sampler = body.get("sampling_session_id")
        if sampler not in self.samplers:
            raise ServeError(f"unknown sampling session {sampler!r}", status=404)
        prompt, num_samples, params, stop_tokens, with_prompt_logprobs = sample_request(body)
        if params.seed is None:  # a seed of its own per request, rather than the clock's
            params = dataclasses.replace(params, seed=derived_seed(sampler, body.get("seq_id", 0)))
        request = (prompt, num_samples, params, stop_tokens, with_prompt_logprobs)

        async def work() -> Result:
            return await self._sample(self.samplers[sampler], *request)

        ids = [f"{sampler}:{body.get('seq_id', 0)}:{i}" for i in range(request[1])]
        return self.futures.start(work), ids

    async def _sample(
        self, key: str, prompt: list[int], num_samples: int, params: SamplingParams,
        stop_tokens: set[int], with_prompt_logprobs: bool,
    ) -> Result:  # fmt: skip
        async with self._sample_lock:  # one snapshot in the engine at a time
            engine = await self._engine_with(key)
            completions = (await engine.sample([prompt], num_samples, params))[0]
            prompt_logprobs = None
            if with_prompt_logprobs:
                scored = (await engine.prompt_logprobs([prompt]))[0]
                prompt_logprobs = [math.nan, *scored]
        sequences = [cut_at_stop_tokens(c, stop_tokens) for c in completions]
        return ("proto", encode_sample_response(sequences, prompt_logprobs))

    async def _engine_with(self, key: str) -> HFRolloutEngine:
        if self._engine is None:
            model = await asyncio.to_thread(load_hf_model, self.model_dir, torch.float32, None)
            self._engine = HFRolloutEngine(model, self.tokenizer(), mode="thread",
                                           num_threads=self.num_threads)  # fmt: skip
            self._base = WeightUpdate(
                tensors={k: v.detach().clone() for k, v in model.state_dict().items()}
            )
            self._loaded, self._loaded_kind = "base", "base"
        if key != self._loaded:
            update = self._base if key == "base" else await asyncio.to_thread(self._snapshot, key)
            version = self._engine.weight_version + 1
            if update.kind == "adapter" and self._loaded_kind == "full":
                # An adapter applies to the engine's base weights: put them back first.
                await self._engine.load_weights(self._base, version)
            await self._engine.load_weights(update, version)
            self._loaded, self._loaded_kind = key, "base" if key == "base" else update.kind
        return self._engine

    def _snapshot(self, key: str) -> WeightUpdate:
        if key.startswith("memory:"):
            update = self.unnamed.get(key)
            if update is None:
                raise ServeError(
                    f"the unnamed sampler snapshot {key} was dropped (only the last "
                    f"{UNNAMED_SNAPSHOTS_KEPT} are kept); save with a name to keep one"
                )
            return update
        return read_snapshot(Path(key))

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    async def finish_session(self, session_id: Any) -> None:
        """A client is done: its models and samplers go (their saved states stay on disk)."""
        self.session(session_id)
        prefix = f"{session_id}:"
        for model_id in [m for m in self.models if m.startswith(prefix)]:
            await self._drop_model(self.models.pop(model_id))
            self.creations.pop(model_id, None)
        for sampler in [k for k in self.samplers if k.startswith(prefix)]:
            del self.samplers[sampler]
        for key in [k for k in self.unnamed if k.startswith(f"memory:{prefix}")]:
            del self.unnamed[key]
        del self.sessions[session_id]

    async def _drop_model(self, model: TrainedModel) -> None:
        if model.task is not None:
            model.task.cancel()
        gone = ("error", (f"{model.model_id}: its session finished", "user"))
        left = [model.queue.get_nowait()[0] for _ in range(model.queue.qsize())]
        left += [future for future, _work in model.waiting.values()]
        model.waiting.clear()
        for future in [model.running, *left]:  # the call in flight and those behind it fail
            if future is not None and not future.done():
                future.set_result(gone)
        await asyncio.to_thread(model.backend.close)

    async def close(self) -> None:
        for model in list(self.models.values()):
            await self._drop_model(model)
        self.models.clear()
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)


# -- conversions --------------------------------------------------------------------------------


def new_model_id(body: dict[str, Any]) -> str:
    """`{session_id}:train:{model_seq_id}`: the id the SDK also derives on its side."""
    seq = body.get("model_seq_id", 0)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ServeError(f"model_seq_id {seq!r}: must be an int >= 0")
    return f"{body['session_id']}:train:{seq}"


def lora_options(lora: dict[str, Any]) -> dict[str, Any]:
    """create_model's lora_config as backend options; rank 0 trains the whole model."""
    rank = lora.get("rank", 32)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ServeError(f"lora_config.rank {rank!r}: must be an int >= 0 (0: full fine-tuning)")
    if rank == 0:
        return {}
    mlp, attn = lora.get("train_mlp", True), lora.get("train_attn", True)
    if not (mlp or attn):
        raise ServeError("lora_config: train_mlp and train_attn are both false; nothing to adapt")
    targets = () if (mlp and attn) else (MLP if mlp else ATTENTION)
    options: dict[str, Any] = {"lora_rank": rank, "lora_alpha": float(rank),
                               "lora_target_modules": targets,
                               "lora_lm_head": bool(lora.get("train_unembed", True))}  # fmt: skip
    if lora.get("seed") is not None:
        options["lora_init_seed"] = int(lora["seed"])
    return options


SUPPORTED_LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")


def make_tinker_loss(name: str, config: dict[str, float | str]) -> LossFn:
    """The named Tinker loss as a backend loss; with "sum" normalisation it sums over tokens."""
    numbers = {k: float(v) for k, v in config.items() if not isinstance(v, str)}
    low, high = numbers.get("clip_low_threshold", 0.8), numbers.get("clip_high_threshold", 1.2)
    builders: dict[str, Callable[[], LossFn]] = {
        "cross_entropy": make_cross_entropy_loss,
        "importance_sampling": make_importance_sampling_loss,
        "ppo": lambda: make_ppo_loss(clip_low=low, clip_high=high),
        "cispo": lambda: make_cispo_loss(clip_low=low, clip_high=high),
        "dro": lambda: make_dro_loss(beta=numbers.get("beta", 0.05)),
    }
    if name not in builders:
        raise ServeError(f"loss_fn {name!r} is not served; supported: {list(SUPPORTED_LOSSES)}")
    return builders[name]()


def tinker_batch(call: ForwardBackwardCall) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Right-padded [B, T] tensors: position i of a datum predicts its target_tokens[i]."""
    lengths = [int(d.tokens.size) for d in call.data]
    rows, width = len(lengths), max(lengths)
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros(rows, width, dtype=torch.long)
    rl = call.loss_fn != "cross_entropy"
    extra = {k: torch.zeros(rows, width) for k in (("sampling_logprobs", "advantages") if rl
                                                    else ("loss_mask",))}  # fmt: skip
    for row, datum in enumerate(call.data):
        n = lengths[row]
        if "target_tokens" not in datum.inputs:
            raise ServeError(f"data[{row}]: loss_fn_inputs has no target_tokens")
        input_ids[row, :n] = torch.from_numpy(datum.tokens)
        labels[row, :n] = torch.from_numpy(datum.inputs["target_tokens"].astype(np.int64))
        attention[row, :n] = 1
        if rl:
            for ours, theirs in (("sampling_logprobs", "logprobs"), ("advantages", "advantages")):
                if theirs not in datum.inputs:
                    raise ServeError(f"data[{row}]: {call.loss_fn} needs loss_fn_inputs.{theirs}")
                extra[ours][row, :n] = torch.from_numpy(datum.inputs[theirs].astype(np.float32))
        else:
            weights = datum.inputs.get("weights")
            extra["loss_mask"][row, :n] = (
                1.0 if weights is None else torch.from_numpy(weights.astype(np.float32))
            )
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, **extra}, lengths


def adam_settings(params: Any) -> AdamSettings:
    if not isinstance(params, dict):
        raise ServeError("optim_step: adam_params is required (an object)")
    clip = float(params.get("grad_clip_norm", 0.0))
    try:
        return AdamSettings(
            learning_rate=float(params.get("learning_rate", 1e-4)),
            betas=(float(params.get("beta1", 0.9)), float(params.get("beta2", 0.95))),
            eps=float(params.get("eps", 1e-12)),
            weight_decay=float(params.get("weight_decay", 0.0)),
            max_grad_norm=clip if clip > 0 else None,
        )
    except ValueError as error:
        raise ServeError(f"optim_step: {error}") from None


def sample_request(body: dict[str, Any]) -> tuple[Any, ...]:
    """(prompt tokens, num_samples, SamplingParams, stop token ids, prompt log-probs wanted)."""
    chunks = (body.get("prompt") or {}).get("chunks") or []
    prompt: list[int] = []
    for chunk in chunks:
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise ServeError(f"prompt: a {chunk.get('type')} chunk; only encoded_text is served")
        prompt += [int(t) for t in chunk.get("tokens", [])]
    if not prompt:
        raise ServeError("sample: the prompt holds no token")
    num_samples = body.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ServeError(f"num_samples {num_samples!r}: must be an int >= 1")
    raw = body.get("sampling_params") or {}
    stop = raw.get("stop")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    strings = tuple(s for s in stop if isinstance(s, str))
    tokens = {int(s) for s in stop if not isinstance(s, str)}
    try:
        params = SamplingParams(
            max_tokens=int(raw.get("max_tokens") or 64),
            temperature=float(raw.get("temperature", 1.0)),
            top_k=int(raw.get("top_k", -1)),
            top_p=float(raw.get("top_p", 1.0)),
            stop=strings or None,
            seed=raw.get("seed"),
        )
    except ValueError as error:
        raise ServeError(f"sampling_params: {error}") from None
    return prompt, num_samples, params, tokens, bool(body.get("prompt_logprobs", False))


def derived_seed(sampler: str, seq_id: Any) -> int:
    """A request's sampling seed when it gives none: from its sampler and seq_id alone."""
    digest = hashlib.sha256(f"{sampler}:{seq_id}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def cut_at_stop_tokens(
    completion: Any, stop_tokens: set[int]
) -> tuple[list[int], list[float], str]:
    """A completion ended at its first stop token (kept), as Tinker's stop token ids ask."""
    tokens, logprobs = list(completion.token_ids), list(completion.logprobs)
    for index, token in enumerate(tokens):
        if token in stop_tokens:
            return tokens[: index + 1], logprobs[: index + 1], "stop"
    return tokens, logprobs, completion.finish_reason


async def load_state(model: TrainedModel, source: Path, optimizer: bool) -> None:
    """A saved state into `model`: weights, and the optimizer's moments only when asked."""
    await model.backend.load_checkpoint(source)
    if not optimizer:
        await model.backend.clear_optimizer_state()


def write_snapshot(update: WeightUpdate, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in update.tensors.items()}, tmp / "weights.safetensors")
    (tmp / "snapshot.json").write_text(json.dumps({"kind": update.kind,
                                                    "scales": dict(update.scales)}))  # fmt: skip
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def read_snapshot(directory: Path) -> WeightUpdate:
    meta = json.loads((directory / "snapshot.json").read_text())
    tensors = load_file(directory / "weights.safetensors")
    return WeightUpdate(tensors=tensors, kind=meta["kind"], scales=meta["scales"])
