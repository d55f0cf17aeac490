"""`FSDPTrainingBackend`: the `TrainingBackend` protocol across ranks, sharded with FSDP2.

Every rank runs the same stream of calls on its own slice of each global batch; parameters,
gradients and optimizer state are sharded over the ranks with `torch.distributed.fsdp.fully_shard`
(one unit per decoder layer, then the root), so each rank holds about 1/world_size of them.

How a step is computed (normalisation "token_mean"), with W_ri the token weight of rank r's slice
in call i:
    forward_backward(slice_ri):  backward of  mean_ri * W_ri          (the slice's weighted sum);
                                 FSDP *sums* the gradients over ranks (divide factor 1)
    optim_step():                grads /= sum_ri W_ri  (all-reduced in each call) ; clip with the
                                 global norm ; optimizer.step ; scheduler.step
which is the gradient of the mean over every token of every rank and call, so N ranks on slices of a
batch give the update of `PyTorchTrainingBackend` on the whole batch (to float32 rounding).
"sum" skips the division.

Results are global and identical on every rank: "loss" is the weighted mean over all ranks' slices
of the call, "num_tokens" and "token_weight" are summed over ranks (only `forward`'s "logprobs" are
this rank's rows). `get_weights()` returns the full state dict on rank 0 and `{}` on the others;
`get_weights(all_ranks=True)` gives every rank its own full copy (each rank's rollout engine).

Rules for callers: every rank submits the same calls in the same order (each call runs collectives);
a rank may pass a slice with no weighted token but must still make the call. Collectives are bounded
by the process group's timeout (see `rollouts.training.distributed`): if a rank dies or stops
calling, the others raise within that bound, their futures carry the error, and the job ends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from rollouts.core.futures import TrainFuture
from rollouts.core.worker import QUEUE_DEPTH_MAX_DEFAULT, SerialWorker
from rollouts.training.backends._queued import (
    QueuedBackend,
    check_step_options,
    require_save_pretrained,
    sampler_comparison,
    thread_setup,
)
from rollouts.training.backends.checkpointing import (
    atomic_directory,
    capture_rng_state,
    checkpoint_path,
    restore_rng_state,
)
from rollouts.training.backends.pytorch import _check_loss_scalar, _logits_of, _to_device
from rollouts.training.distributed import World
from rollouts.training.losses import Batch, LossFn, label_logprobs, token_weights

__all__ = ["FSDPTrainingBackend", "shard_model"]

DCP_DIR = "dcp"  # torch.distributed.checkpoint files: model and optimizer shards, .metadata
META_FILE = "meta.json"
CLIP_EPS = 1e-6  # as in torch.nn.utils.clip_grads_with_norm_


def shard_model(
    model: nn.Module,
    world: World,
    *,
    mixed_precision: torch.dtype | None = None,
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    block_class_names: tuple[str, ...] | None = None,
) -> nn.Module:
    """Apply FSDP2 in place: `fully_shard` on each transformer block, then on the root.

    `mixed_precision` (e.g. torch.bfloat16) computes in that dtype and reduces gradients in
    float32; None computes in the parameters' own dtype. `cpu_offload` keeps sharded parameters,
    gradients and optimizer state in CPU memory. `activation_checkpointing` recomputes each
    block's activations in backward (Hugging Face models). Blocks are the classes named in
    `block_class_names`, by default the model's `_no_split_modules` (e.g. "LlamaDecoderLayer").
    `reshard_after_forward=True` frees each unit's gathered parameters after its forward and
    gathers them again in backward (least memory); False keeps them until the backward. Every rank
    must pass identical weights. Build the optimizer afterwards.
    """
    names = block_class_names or tuple(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(
            f"no transformer block found in {type(model).__name__} (looked for classes {names}); "
            "pass block_class_names=('MyDecoderLayer',)"
        )
    if activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"activation_checkpointing=True, but {type(model).__name__} is not a Hugging Face "
                "model that supports gradient checkpointing"
            )
        # Non-reentrant checkpointing recomputes inside FSDP2's hooks, which recognise the
        # recomputation (during backward) and leave the unshard/reshard to the backward hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh(world.device.type, (world.world_size,))
    policy = (
        MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
        if mixed_precision is not None
        else MixedPrecisionPolicy()
    )
    # Pinned memory needs CUDA; on a CPU-only job "offload" only keeps the states where they are.
    offload = CPUOffloadPolicy(pin_memory=world.device.type == "cuda") if cpu_offload else None
    options: dict[str, Any] = dict(
        mesh=mesh,
        mp_policy=policy,
        offload_policy=offload or OffloadPolicy(),
        reshard_after_forward=reshard_after_forward,
    )
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)  # the rest: embeddings, final norm, head
    return model


class FSDPTrainingBackend(QueuedBackend):
    """A `shard_model`-ed model, its optimizer, loss and scheduler across ranks, behind futures.

    Build the optimizer over the sharded model's parameters. `max_grad_norm=None` disables
    clipping (the global norm is still reported). Mixed precision is the model's FSDP policy
    (`shard_model(mixed_precision=...)`), not an autocast here.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        checkpoint_dir: str | Path,
        world: World,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_grad_norm: float | None = 1.0,
        *,
        normalization: str = "token_mean",
        queue_depth_max: int = QUEUE_DEPTH_MAX_DEFAULT,
        num_threads: int | None = None,
    ) -> None:
        check_step_options(normalization, max_grad_norm)
        if not isinstance(model, FSDPModule):
            raise ValueError(
                f"{type(model).__name__} is not sharded; call shard_model(model, world) and build "
                "the optimizer over its parameters before creating the backend"
            )
        if not dist.is_initialized() or dist.get_world_size() != world.world_size:
            raise ValueError(f"{world} does not match the initialised process group")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.scheduler = scheduler
        self.checkpoint_dir = Path(checkpoint_dir)
        self.world = world
        self.device = world.device
        self.max_grad_norm = max_grad_norm
        self.normalization = normalization
        _sum_gradients_over_ranks(model)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._step = 0
        self._reset_accumulation()
        self._worker = SerialWorker(
            f"FSDPTrainingBackend[rank {world.rank}]",
            queue_depth_max,
            thread_setup(num_threads, world.device),
        )

    def _forward_backward(self, batch: Batch) -> dict[str, Any]:
        batch = _to_device(batch, self.device)
        weights_BT = token_weights(batch)
        self.model.train()
        with torch.enable_grad():
            logits = _logits_of(self.model, batch)
            loss = self.loss_fn(logits, batch)
            _check_loss_scalar(loss)
            # The slice's weighted sum: FSDP adds the ranks' gradients, optim_step normalises.
            (loss * weights_BT.sum()).backward()
        result = self._global_stats(loss.detach(), weights_BT)
        self._accum_weight += result["token_weight"]
        self._accum_tokens += result["num_tokens"]
        self._accum_calls += 1
        return result | sampler_comparison(logits, batch)

    @torch.no_grad()
    def _forward(self, batch: Batch) -> dict[str, Any]:
        batch = _to_device(batch, self.device)
        weights_BT = token_weights(batch)
        self.model.eval()
        logits = _logits_of(self.model, batch)
        loss = self.loss_fn(logits, batch)
        _check_loss_scalar(loss)
        result = self._global_stats(loss, weights_BT)
        result["logprobs"] = label_logprobs(logits, batch["labels"]).cpu()
        return result

    def _global_stats(self, loss: torch.Tensor, weights_BT: torch.Tensor) -> dict[str, Any]:
        """The call's loss, token count and weight over all ranks (one all-reduce)."""
        weight = weights_BT.sum().double()
        local = torch.stack([loss.double() * weight, weight, (weights_BT != 0).sum().double()])
        dist.all_reduce(local)
        weighted_loss_sum, token_weight, num_tokens = local.tolist()
        loss_mean = weighted_loss_sum / token_weight if token_weight > 0 else 0.0
        return {"loss": loss_mean, "num_tokens": int(num_tokens), "token_weight": token_weight}

    def _optim_step(self) -> dict[str, Any]:
        scale = self._normalisation_scale(self.normalization, " on any rank")
        grad_norm = _scale_and_clip_sharded(self._params, scale, self.max_grad_norm, self.device)
        # The norm is global, so a non-finite one stops every rank alike.
        return self._apply_step(grad_norm, self.optimizer.step)

    def _save_checkpoint(self, step: int) -> Path:
        """Every rank writes its shards into rank 0's temporary directory; rank 0 renames it."""
        self._assert_no_pending_gradients("save_checkpoint")
        final_path = checkpoint_path(self.checkpoint_dir, step)
        if self.world.is_main:
            with atomic_directory(final_path) as tmp_path:
                self._write_checkpoint(_broadcast_path(tmp_path), step)
        else:
            self._write_checkpoint(_broadcast_path(None), step)
        dist.barrier()  # no rank goes on (or loads) before the rename
        return final_path

    def _write_checkpoint(self, tmp_path: Path, step: int) -> None:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        dcp.save(
            {"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp_path / DCP_DIR
        )
        rank_state = {
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "optimizer_step": self._step,
            "rng": capture_rng_state(),
        }
        torch.save(rank_state, tmp_path / _rank_file(self.world.rank))
        if self.world.is_main:
            meta = {
                "step": step,
                "optimizer_step": self._step,
                "backend": "fsdp",
                "world_size": self.world.world_size,
            }
            (tmp_path / META_FILE).write_text(json.dumps(meta, indent=2))
        dist.barrier()  # every rank's files are written before rank 0 flushes and renames

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        self._check_checkpoint_files(path)
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("backend") != "fsdp" or meta.get("world_size") != self.world.world_size:
            raise ValueError(
                f"{path / META_FILE}: backend={meta.get('backend')!r}, "
                f"world_size={meta.get('world_size')}; this job needs an 'fsdp' checkpoint "
                f"written by {self.world.world_size} ranks (the RNG state is per rank)"
            )
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=path / DCP_DIR)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        # Our own file, holding NumPy RNG state, hence weights_only=False: load trusted paths only.
        rank_state = torch.load(path / _rank_file(self.world.rank), weights_only=False)
        if self.scheduler is not None:
            if rank_state["scheduler"] is None:
                raise ValueError(f"{path} holds no scheduler state but this backend has one")
            self.scheduler.load_state_dict(rank_state["scheduler"])
        restore_rng_state(rank_state["rng"])
        self.optimizer.zero_grad(set_to_none=True)
        self._step = int(rank_state["optimizer_step"])
        self._reset_accumulation()
        return {"step": self._step}

    def _check_checkpoint_files(self, path: Path) -> None:
        """Raise on every rank if any rank lacks a file, so no rank waits in `dcp.load`."""
        required = (
            path / META_FILE,
            path / DCP_DIR / ".metadata",
            path / _rank_file(self.world.rank),
        )
        missing = [str(file) for file in required if not file.is_file()]
        problems: list[list[str] | None] = [None] * self.world.world_size
        dist.all_gather_object(problems, missing)
        for rank, rank_missing in enumerate(problems):
            if rank_missing:
                raise FileNotFoundError(
                    f"not a checkpoint directory: {path} (rank {rank} is missing {rank_missing})"
                )

    def get_weights(self, *, all_ranks: bool = False) -> TrainFuture[dict[str, torch.Tensor]]:
        """The full weights on CPU: on rank 0 only (`{}` elsewhere), or on every rank."""
        return self._worker.submit("get_weights", lambda: self._get_weights(all_ranks))

    def _get_weights(self, all_ranks: bool = False) -> dict[str, torch.Tensor]:
        """The full state dict, gathered over ranks onto CPU, on rank 0 (or on all ranks)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
        full = get_model_state_dict(self.model, options=options)
        if all_ranks:  # gathered on each rank's device: copy to CPU
            return {name: tensor.detach().to("cpu", copy=True) for name, tensor in full.items()}
        if not self.world.is_main:
            assert not full, "full_state_dict with cpu_offload fills rank 0 only"
            return {}
        live_ptrs = {
            _local(t).untyped_storage().data_ptr() for t in self.model.state_dict().values()
        }
        # Gathered tensors are fresh; a tensor FSDP does not manage could alias the live one.
        return {
            name: tensor.detach().clone()
            if tensor.untyped_storage().data_ptr() in live_ptrs
            else tensor
            for name, tensor in full.items()
        }

    def _export_hf(self, path: Path) -> Path:
        save_pretrained = require_save_pretrained(self.model)
        full_state = self._get_weights()  # collective: every rank takes part
        if self.world.is_main:
            with atomic_directory(path) as tmp_path:
                # transformers names the class without the "FSDP" prefix that fully_shard adds.
                save_pretrained(tmp_path, state_dict=full_state)
        dist.barrier()  # the directory exists before any rank returns its path
        return path


# -- pure pieces ----------------------------------------------------------------------------------


def _sum_gradients_over_ranks(model: nn.Module) -> None:
    """Make FSDP's reduce-scatter a plain sum: the backend divides by the global token weight."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A SUM reduction with no pre/post factor; gloo has no PREMUL_SUM.
            module.set_force_sum_reduction_for_comms(True)


def _scale_and_clip_sharded(
    params: list[nn.Parameter], scale: float, max_grad_norm: float | None, device: torch.device
) -> float:
    """Scale every gradient shard, clip with the norm over all ranks' shards; return that norm."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        raise RuntimeError("optim_step: no parameter has a gradient")
    if scale != 1.0:
        torch._foreach_mul_(grads, scale)
    shard_norms = torch._foreach_norm(grads, 2.0)
    squared_sum = torch.stack([norm.float().square() for norm in shard_norms]).sum().to(device)
    dist.all_reduce(squared_sum)
    total_norm = squared_sum.sqrt()
    if max_grad_norm is not None:
        clip_coef = torch.clamp(max_grad_norm / (total_norm + CLIP_EPS), max=1.0)
        torch._foreach_mul_(grads, clip_coef.to(grads[0].device))
    return float(total_norm)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _rank_file(rank: int) -> str:
    return f"trainer_state_rank{rank:05d}.pt"


def _broadcast_path(path: Path | None) -> Path:
    """Rank 0's `path`, on every rank (all ranks write into the same temporary directory)."""
    holder = [str(path) if path is not None else None]
    dist.broadcast_object_list(holder, src=0)
    assert holder[0] is not None, "rank 0 broadcasts a path"
    return Path(holder[0])
