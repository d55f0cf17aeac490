"""`TinkerTrainingBackend`: our `TrainingBackend` protocol over the Tinker API's training client,
so `run_sft_training` and `run_rl_training` drive a Tinker service (hosted, or `rollouts serve`)
unchanged (`rollouts.inference.tinker_engine.TinkerRolloutEngine` samples the weights it saves).

    backend = TinkerTrainingBackend.create(
        base_url="http://127.0.0.1:8000", api_key="tml-...", base_model="./my-model",
        checkpoint_dir="runs/x/checkpoints", lora_rank=8, learning_rate=1e-4,
    )

The model lives on the service; this side converts batches and queues the SDK's calls on one
worker thread in submission order (the `SerialWorker` every backend uses), so futures, ordering,
refusals and shutdown behave as on the other backends. Mapping:

- A batch row is one Tinker datum: its tokens up to `attention_mask`'s length, `labels` as
  target tokens (-100 becomes a weight-0 token), `token_weights` as the weights; an RL batch's
  `sampling_logprobs` and `advantages` (times the token weight) as the RL loss inputs.
- The loss must be one the Tinker API computes: `tinker_spec(loss_fn)` names it (cross-entropy,
  importance sampling, PPO, CISPO; none with a KL term). Tinker's losses are sums over tokens, so
  this backend's normalisation is "sum" and equals `PyTorchTrainingBackend(normalization="sum")`.
- `optim_step` sends AdamW settings every step: the backend's own, or the call's `AdamSettings`.
- `save_checkpoint(step)` saves the state on the service (`save_state`) and writes a local
  directory `step_N/` naming it, so checkpoints list and load as on any backend.
- `sampler_weights()` saves weights for sampling and returns a `WeightUpdate` of kind "remote"
  naming them; the Tinker rollout engine's `load_weights` points its sampler there.
- The weights themselves never come back: `get_weights` and `export_hf` are refused.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from rollouts.core.futures import TrainFuture
from rollouts.core.weights import WeightUpdate
from rollouts.core.worker import SerialWorker
from rollouts.training.backends.checkpointing import (
    checkpoint_path,
    delete_directory,
    list_checkpoints,
    step_of,
)
from rollouts.training.backends.protocol import (
    AdamSettings,
    Checkpoint,
    DataParallel,
    check_step_overrides,
)
from rollouts.training.losses import (
    IGNORE_INDEX,
    Batch,
    LossFn,
    cross_entropy_loss,
    tinker_spec,
    token_weights,
)

__all__ = ["TinkerTrainingBackend", "tinker_datums"]

TINKER_HINT = 'the Tinker backend needs the tinker SDK: pip install "rollouts[serve]"'
_log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 600.0  # the longest one service call may take before it fails
CHECKPOINT_FILE = "tinker_state.json"  # in each local step_N/: the service's path of the state


def _tinker() -> Any:
    try:
        import tinker
    except ImportError as error:
        raise ImportError(TINKER_HINT) from error
    return tinker


class TinkerTrainingBackend:
    """See the module docstring."""

    queue_depth_max = 64

    def __init__(
        self,
        training_client: Any,
        checkpoint_dir: str | Path,
        *,
        loss_fn: LossFn = cross_entropy_loss,
        learning_rate: float = 1e-4,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        service_client: Any = None,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        self._spec(loss_fn, "loss_fn")  # a loss the service cannot compute is refused now
        self.training_client, self.service_client = training_client, service_client
        self.call_timeout_s = call_timeout_s  # each service call's bound; past it the call fails
        self.checkpoint_dir = Path(checkpoint_dir)
        self.loss_fn = loss_fn
        self.adam = AdamSettings(
            learning_rate=learning_rate, betas=adam_betas, eps=eps,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        )  # fmt: skip
        self.normalization = "sum"
        self._step = 0
        self._accum_tokens = 0  # weighted tokens since the last step, as optim_step reports
        self._owns_service = False
        self._worker = SerialWorker("TinkerTrainingBackend", self.queue_depth_max)

    @classmethod
    def create(
        cls,
        *,
        base_url: str | None,
        api_key: str | None,
        base_model: str,
        checkpoint_dir: str | Path,
        lora_rank: int = 32,
        seed: int | None = None,
        **options: Any,
    ) -> TinkerTrainingBackend:
        """A new model on the service: LoRA of `lora_rank` (0: the whole model, on
        `rollouts serve`)."""
        tinker = _tinker()
        service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
        client = service.create_lora_training_client(
            base_model=base_model, rank=lora_rank, seed=seed
        )
        backend = cls(client, checkpoint_dir, service_client=service, **options)
        backend._owns_service = True  # create() opened the session, so close() finishes it
        return backend

    # -- the protocol ---------------------------------------------------------------------------

    @property
    def data_parallel(self) -> DataParallel:
        return DataParallel()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # batches are built here; the model is on the service

    @property
    def num_parameters(self) -> int:
        return 0  # not reported by the service

    @property
    def step(self) -> int:
        return self._step

    def forward_backward(
        self, batch: Batch, *, loss_fn: LossFn | None = None, return_logprobs: bool = False
    ) -> TrainFuture[dict[str, Any]]:
        name, config = self._spec(loss_fn or self.loss_fn, "forward_backward(loss_fn=...)")
        data, shape = tinker_datums(batch, name)
        return self._worker.submit(
            "forward_backward", lambda: self._run(data, shape, name, config, forward_only=False)
        )

    def forward(
        self, batch: Batch, *, loss_fn: LossFn | None = None
    ) -> TrainFuture[dict[str, Any]]:
        name, config = self._spec(loss_fn or self.loss_fn, "forward(loss_fn=...)")
        data, shape = tinker_datums(batch, name)
        return self._worker.submit(
            "forward", lambda: self._run(data, shape, name, config, forward_only=True)
        )

    def optim_step(
        self,
        *,
        learning_rate: float | None = None,
        layer_grad_norms: bool = False,
        adam: AdamSettings | None = None,
    ) -> TrainFuture[dict[str, Any]]:
        if layer_grad_norms:
            raise ValueError("optim_step(layer_grad_norms=True): the Tinker API reports none")
        check_step_overrides(learning_rate, adam)
        settings = adam or self.adam
        if learning_rate is not None:
            settings = AdamSettings(**{**settings.__dict__, "learning_rate": learning_rate})
        return self._worker.submit("optim_step", lambda: self._optim_step(settings))

    def discard_gradients(self) -> TrainFuture[dict[str, Any]]:
        raise ValueError("discard_gradients: the Tinker API cannot drop accumulated gradients")

    def save_checkpoint(self, step: int) -> TrainFuture[Path]:
        final_path = checkpoint_path(self.checkpoint_dir, step)
        return self._worker.submit("save_checkpoint", lambda: self._save(final_path, step))

    def load_checkpoint(self, path: str | Path) -> TrainFuture[dict[str, Any]]:
        return self._worker.submit("load_checkpoint", lambda: self._load(Path(path)))

    def list_checkpoints(self) -> list[Checkpoint]:
        return [Checkpoint(step_of(p) or 0, p) for p in list_checkpoints(self.checkpoint_dir)]

    def find_checkpoint(self, step: int) -> Checkpoint | None:
        path = checkpoint_path(self.checkpoint_dir, step)
        return Checkpoint(step, path) if path.is_dir() else None

    def delete_checkpoint(self, step: int) -> None:
        found = self.find_checkpoint(step)
        if found is not None:
            delete_directory(found.path)

    def get_weights(self) -> TrainFuture[dict[str, torch.Tensor]]:
        raise ValueError("get_weights: the weights stay on the Tinker service; sample with "
                         "sampler_weights() and a TinkerRolloutEngine instead")  # fmt: skip

    def sampler_weights(self) -> TrainFuture[WeightUpdate]:
        return self._worker.submit("sampler_weights", self._sampler_weights)

    def export_hf(self, path: str | Path, *, adapter_only: bool = False) -> TrainFuture[Path]:
        raise ValueError("export_hf: the weights stay on the Tinker service; download a saved "
                         "state with the service's own tools")  # fmt: skip

    def close(self) -> None:
        """Finish the queued calls; a backend from `create` also ends its service session
        (bounded; a service already gone is only logged)."""
        self._worker.close()
        if self._owns_service:
            self._owns_service = False
            try:
                self.service_client.close(status="success").result(timeout=self.call_timeout_s)
            except Exception as error:  # the session's end must not hide the run's outcome
                _log.warning("TinkerTrainingBackend: ending the service session failed: %s", error)

    def __enter__(self) -> TinkerTrainingBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- bodies, on the worker thread -------------------------------------------------------------

    def _spec(self, loss_fn: LossFn, where: str) -> tuple[str, dict[str, float]]:
        spec = tinker_spec(loss_fn)
        if spec is None:
            raise ValueError(
                f"{where}: {getattr(loss_fn, '__name__', loss_fn)!r} has no Tinker equivalent; "
                "the service computes cross-entropy, importance sampling, PPO and CISPO "
                "(rollouts.training.losses, without a KL term)"
            )
        return spec

    def _run(
        self, data: list[Any], shape: BatchShape, name: str,
        config: dict[str, float], forward_only: bool,
    ) -> dict[str, Any]:  # fmt: skip
        client = self.training_client
        call = client.forward if forward_only else client.forward_backward
        result = call(data, name, loss_fn_config=config or None).result(timeout=self.call_timeout_s)
        rows, width, weight, num_tokens = shape
        logprobs = torch.zeros(rows, width)
        for row, output in enumerate(result.loss_fn_outputs):
            values = torch.as_tensor(output["logprobs"].tolist(), dtype=torch.float32)
            logprobs[row, : values.numel()] = values
        loss_sum = float(result.metrics["loss:sum"])
        if not forward_only:
            self._accum_tokens += num_tokens
        return {
            "loss": loss_sum / weight if weight > 0 else 0.0,  # a weighted mean, as elsewhere
            "token_weight": weight,
            "num_tokens": num_tokens,
            "logprobs": logprobs,
        }

    def _optim_step(self, settings: AdamSettings) -> dict[str, Any]:
        tinker = _tinker()
        params = tinker.types.AdamParams(
            learning_rate=settings.learning_rate, beta1=settings.betas[0],
            beta2=settings.betas[1], eps=settings.eps, weight_decay=settings.weight_decay,
            grad_clip_norm=settings.max_grad_norm or 0.0,
        )  # fmt: skip
        metrics = (
            self.training_client.optim_step(params).result(timeout=self.call_timeout_s).metrics
            or {}
        )
        self._step += 1
        grad_norm = metrics.get("grad_norm", math.nan)
        num_tokens, self._accum_tokens = self._accum_tokens, 0
        return {"step": self._step, "lr": settings.learning_rate, "grad_norm": grad_norm,
                "skipped": False, "num_tokens": num_tokens}  # fmt: skip

    def _save(self, final_path: Path, step: int) -> Path:
        saved = self.training_client.save_state(final_path.name).result(timeout=self.call_timeout_s)
        final_path.mkdir(parents=True, exist_ok=True)
        record = {"path": saved.path, "step": step, "optimizer_steps": self._step}
        (final_path / CHECKPOINT_FILE).write_text(json.dumps(record))
        return final_path

    def _load(self, path: Path) -> dict[str, Any]:
        record_path = path / CHECKPOINT_FILE
        if not record_path.is_file():
            raise FileNotFoundError(f"{path}: no {CHECKPOINT_FILE}; not a Tinker checkpoint")
        record = json.loads(record_path.read_text())
        self.training_client.load_state_with_optimizer(record["path"]).result(
            timeout=self.call_timeout_s
        )
        self._step = int(record["optimizer_steps"])
        return {"step": self._step, "path": record["path"]}

    def _sampler_weights(self) -> WeightUpdate:
        name = f"sampler-{self._step:08d}"
        saved = self.training_client.save_weights_for_sampler(name).result(
            timeout=self.call_timeout_s
        )
        return WeightUpdate(tensors={}, kind="remote", location=saved.path)


BatchShape = tuple[int, int, float, int]  # rows, width, token weight, weighted tokens


def tinker_datums(batch: Batch, loss_name: str) -> tuple[list[Any], BatchShape]:
    """Our [B, T] batch as Tinker datums, one per row (see the module docstring)."""
    tinker = _tinker()
    temperature = batch.get("temperature")
    if temperature is not None and float(temperature) != 1.0:
        raise ValueError(
            f"a batch sampled at temperature {float(temperature)}: the Tinker API scores "
            "log-probs at temperature 1 only, so its RL losses would not match the sampler; "
            "sample at temperature 1"
        )
    input_ids, labels = batch["input_ids"], batch["labels"]
    weights_BT = token_weights(batch)
    mask = batch.get("attention_mask")
    lengths = mask.sum(1).tolist() if mask is not None else [input_ids.shape[1]] * len(input_ids)
    data = []
    for row, length in enumerate(int(n) for n in lengths):
        targets = labels[row, :length].clone()
        targets[targets == IGNORE_INDEX] = 0
        weights = weights_BT[row, :length]
        inputs: dict[str, Any] = {"target_tokens": targets.tolist()}
        if loss_name == "cross_entropy":
            inputs["weights"] = weights.tolist()
        else:
            inputs["logprobs"] = (batch["sampling_logprobs"][row, :length] * (weights > 0)).tolist()
            inputs["advantages"] = (batch["advantages"][row, :length] * weights).tolist()
        data.append(tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints(input_ids[row, :length].tolist()),
            loss_fn_inputs=inputs,
        ))  # fmt: skip
    shape = (len(lengths), input_ids.shape[1], float(weights_BT.sum()), int((weights_BT > 0).sum()))
    return data, shape
