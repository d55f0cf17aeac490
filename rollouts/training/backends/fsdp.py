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
`sampler_weights()` gives every rank its own full copy (each rank's rollout engine).

Rules for callers: every rank submits the same calls in the same order (each call runs collectives);
a rank may pass a slice with no weighted token but must still make the call. Collectives are bounded
by the process group's timeout (see `rollouts.training.distributed`): if a rank dies or stops
calling, the others raise within that bound, their futures carry the error, and the job ends.

Errors keep the ranks in step. A refusal is decided on global figures (pending gradients, the
step's token weight, the gradient norm), so every rank refuses alike and all go on. Checkpoint and
export steps that can fail on one rank (a directory rank 0 cannot create, a file one rank cannot
write) end with an agreement: every rank learns every rank's outcome and raises the same
`CheckpointFailedError` within seconds, with nothing renamed into place. Any other exception may
leave the ranks at different collectives, so it stops the stream; if every rank failed alike,
`load_checkpoint(path)` on every rank repairs it, otherwise end the job and resume it. A batch that
fails its checks raises on the submitting rank only: that rank should stop (its peers then fail
within the collective timeout, or at once when its process exits).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
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

from rollouts.core.weights import WeightUpdate
from rollouts.core.worker import QUEUE_DEPTH_MAX_DEFAULT
from rollouts.training.backends._queued import (
    QueuedBackend,
    require_save_pretrained,
    write_hf_directory,
)
from rollouts.training.backends.checkpointing import (
    TRAINED_ONLY,
    abort_directory,
    begin_directory,
    capture_rng_state,
    commit_directory,
    restore_rng_state,
    step_of,
    verify_checksums,
    write_checksums,
)
from rollouts.training.backends.lora import adapter_update, is_lora_model
from rollouts.training.backends.protocol import DataParallel
from rollouts.training.backends.pytorch_factory import enable_activation_checkpointing
from rollouts.training.distributed import World
from rollouts.training.errors import CheckpointFailedError
from rollouts.training.lm_head import HEAD_CHUNK_AUTO
from rollouts.training.losses import Batch, LossFn

__all__ = ["FSDPTrainingBackend", "shard_model"]

DCP_DIR = "dcp"  # torch.distributed.checkpoint files: model and optimizer shards, .metadata
META_FILE = "meta.json"
CLIP_EPS = 1e-6  # as in torch.nn.utils.clip_grads_with_norm_
COLLECTIVES = "collectives"  # what any non-refused failure leaves suspect: the ranks' lockstep
RECOVERY_HINTS = {
    COLLECTIVES: "if every rank failed alike, call load_checkpoint(path) on every rank; "
    "otherwise end the job and resume it from its last checkpoint",
}
# close() and interpreter exit wait this much longer than a collective may take, so a worker
# never gives up on a call that its own collective timeout would still let finish.
CLOSE_MARGIN_S = 60.0


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
        # Non-reentrant checkpointing recomputes inside FSDP2's hooks, which recognise the
        # recomputation (during backward) and leave the unshard/reshard to the backward hooks.
        enable_activation_checkpointing(model)
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
    (`shard_model(mixed_precision=...)`), not an autocast here. `close_timeout_s` defaults to the
    process group's timeout plus a margin.
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
        num_threads: int | str | None = None,
        close_timeout_s: float | None = None,
        tokenizer: Any | None = None,
        head_chunk_logits: int | str | None = HEAD_CHUNK_AUTO,
    ) -> None:
        if not isinstance(model, FSDPModule):
            raise ValueError(
                f"{type(model).__name__} is not sharded; call shard_model(model, world) and build "
                "the optimizer over its parameters before creating the backend"
            )
        if not dist.is_initialized() or dist.get_world_size() != world.world_size:
            raise ValueError(f"{world} does not match the initialised process group")
        super().__init__(
            name=f"FSDPTrainingBackend[rank {world.rank}]",
            model=model,
            optimizer=optimizer,
            loss_fn=loss_fn,
            checkpoint_dir=checkpoint_dir,
            device=world.device,
            scheduler=scheduler,
            max_grad_norm=max_grad_norm,
            normalization=normalization,
            queue_depth_max=queue_depth_max,
            num_threads=num_threads,
            close_timeout_s=close_timeout_s or world.timeout_s + CLOSE_MARGIN_S,
            data_parallel=DataParallel(rank=world.rank, size=world.world_size),
            recovery_hints=RECOVERY_HINTS,
            tokenizer=tokenizer,
            head_chunk_logits=head_chunk_logits,
        )
        self.world = world
        _sum_gradients_over_ranks(model)
        # The LM head runs after the root's forward (rollouts.training.lm_head), so the root's
        # weights (embeddings, final norm, head) stay gathered from its forward to its backward,
        # as FSDP2 keeps a root by default; the calls below free them when no backward does.
        model.set_reshard_after_forward(False, recurse=False)
        if self._head_owner is not None and isinstance(
            self._head_owner._modules["lm_head"], FSDPModule
        ):
            # A head sharded as its own unit would gather and reduce once per chunk, and the
            # ranks' chunk counts differ: such a model keeps its full logits.
            self._head_chunk_tokens = None

    # -- the pieces of the shared bodies -----------------------------------------------------------

    def _forward_backward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super()._forward_backward(*args, **kwargs)
        finally:  # a no-op after the backward; after a failure it frees the gathered root
            self.model.reshard()

    def _forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super()._forward(*args, **kwargs)
        finally:  # no backward frees the root's gathered weights (nor sees an update to them)
            self.model.reshard()

    def _touch(self, state: str) -> None:
        # Whatever a call touches, a one-sided failure may leave the ranks out of step.
        self._worker.touch(COLLECTIVES)

    def _prepare(self, batch: Batch, call: str, values_checked: bool) -> dict[str, Any]:
        self._touch(COLLECTIVES)  # a check failing on one rank must not let it run ahead
        return super()._prepare(batch, call, values_checked)

    def _where(self) -> str:
        return " on any rank"

    def _reference_weight(self, local_weight: float) -> float:
        # R = 1: each rank backpropagates its slice's weighted sum, the reduction adds them up
        # and optim_step divides by the global weight. A per-rank R would differ between ranks.
        return 1.0

    def _call_stats(self, loss: torch.Tensor, weights_BT: torch.Tensor) -> dict[str, Any]:
        """The call's loss, token count and weight over all ranks (one all-reduce)."""
        weight = weights_BT.sum().double()
        local = torch.stack([loss.double() * weight, weight, (weights_BT != 0).sum().double()])
        dist.all_reduce(local)
        weighted_loss_sum, token_weight, num_tokens = local.tolist()
        loss_mean = weighted_loss_sum / token_weight if token_weight > 0 else 0.0
        return {"loss": loss_mean, "num_tokens": int(num_tokens), "token_weight": token_weight}

    def _clip_gradients(self, scale: float) -> float:
        # The norm is global, so a non-finite one is refused by every rank alike.
        return _scale_and_clip_sharded(self._params, scale, self.max_grad_norm, self.device)

    def _step_optimizer(self) -> bool | None:
        return self.optimizer.step()

    def _squared_norms_by_layer(self, layers: list[str]) -> dict[str, float]:
        """Each rank sums its shards' squares per layer; one all-reduce adds the ranks up."""
        names = sorted(set(layers))
        index = {layer: i for i, layer in enumerate(names)}
        local = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        for layer, param in zip(layers, self._params, strict=True):
            if param.grad is not None:
                shard = _local(param.grad).double()  # on CPU too, with cpu_offload
                local[index[layer]] += shard.square().sum().to(local.device)
        dist.all_reduce(local)
        return dict(zip(names, local.tolist(), strict=True))

    # -- checkpoints -------------------------------------------------------------------------------

    def _write_checkpoint(self, final_path: Path) -> None:
        """Rank 0 makes a temporary directory, every rank writes its shards and state into it,
        rank 0 renames it into place; each step ends in an agreement (see the module docstring)."""
        (tmp_path, *_) = self._agree("create the checkpoint directory", begin_directory, final_path)
        try:
            model_state, optimizer_state = get_state_dict(
                self.model, self.optimizer, options=self._state_options()
            )
            self._touch(COLLECTIVES)
            try:
                dcp.save(
                    {"model": model_state, "optimizer": optimizer_state},
                    checkpoint_id=tmp_path / DCP_DIR,
                )
            except CheckpointException:
                self._worker.settle()  # DCP raises on every rank alike: the ranks stay in step
                raise
            self._worker.settle()
            self._agree_all("write the trainer state", self._write_rank_files, tmp_path, final_path)
            self._agree("record the checksums", write_checksums, tmp_path)
            self._agree("rename the checkpoint into place", commit_directory, tmp_path, final_path)
        except BaseException:
            if self.world.is_main:
                abort_directory(tmp_path)
            raise

    def _write_rank_files(self, tmp_path: Path, final_path: Path) -> None:
        rank_state = {
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "optimizer_step": self._step,
            "rng": capture_rng_state(),
        }
        torch.save(rank_state, tmp_path / _rank_file(self.world.rank))
        if self.world.is_main:
            meta = {
                "step": step_of(final_path),
                "optimizer_step": self._step,
                "backend": "fsdp",
                "world_size": self.world.world_size,
                "weights": TRAINED_ONLY if self._trains_subset else "all",
            }
            (tmp_path / META_FILE).write_text(json.dumps(meta, indent=2))

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        nothing = "nothing was loaded and the backend is as it was"
        rank = self.world.rank
        self._agree_all(
            "find the checkpoint files", _check_checkpoint_files, path, rank, done=nothing
        )
        self._agree("verify the checkpoint's checksums", verify_checksums, path, done=nothing)
        # Every check that reads a file ends in an agreement too: a rank refusing on its own
        # would go on to the next call while the others enter dcp.load's collectives.
        loaded: dict[str, Any] = {}  # kept on this rank: only the outcome is gathered

        def read() -> None:
            loaded.update(self._read_rank_state(path))

        self._agree_all("read the trainer state", read, done=nothing)
        rank_state = loaded
        self._touch(COLLECTIVES)
        options = self._state_options()
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=options)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=path / DCP_DIR)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=options,
        )
        if self.scheduler is not None:
            self.scheduler.load_state_dict(rank_state["scheduler"])
        restore_rng_state(rank_state["rng"])
        self._discard_gradients()
        self._step = int(rank_state["optimizer_step"])
        return {"step": self._step}

    def _state_options(self) -> StateDictOptions:
        """A LoRA backend's checkpoints hold the trained weights only (the base is frozen and
        comes from the model directory); loading them must then leave the base untouched."""
        if not self._trains_subset:
            return StateDictOptions()
        return StateDictOptions(ignore_frozen_params=True, strict=False)

    def _read_rank_state(self, path: Path) -> dict[str, Any]:
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("backend") != "fsdp" or meta.get("world_size") != self.world.world_size:
            raise ValueError(
                f"{path / META_FILE}: backend={meta.get('backend')!r}, "
                f"world_size={meta.get('world_size')}; this job needs an 'fsdp' checkpoint "
                f"written by {self.world.world_size} ranks (the RNG state is per rank)"
            )
        if (meta.get("weights", "all") == TRAINED_ONLY) != self._trains_subset:
            holds = "only trained (adapter)" if self._trains_subset is False else "all"
            raise ValueError(
                f"{path / META_FILE}: the checkpoint holds {holds} weights, but this backend "
                f"trains {'only some (LoRA)' if self._trains_subset else 'all'}; load it into a "
                "backend built the same way (same base model, same lora_rank and targets)"
            )
        # Our own file, holding NumPy RNG state, hence weights_only=False: load trusted paths only.
        rank_state = torch.load(path / _rank_file(self.world.rank), weights_only=False)
        if (rank_state["scheduler"] is None) != (self.scheduler is None):
            raise ValueError(
                f"{path}: the checkpoint and this backend differ in having a scheduler"
            )
        return rank_state

    def _agree(self, what: str, fn: Callable[..., Any], *args: Any, done: str = "") -> list[Any]:
        """Run `fn(*args)` on rank 0 only, then tell every rank its result or its error."""
        return self._agree_all(what, fn if self.world.is_main else _nothing, *args, done=done)

    def _agree_all(
        self, what: str, fn: Callable[..., Any], *args: Any, done: str = ""
    ) -> list[Any]:
        """Run `fn(*args)` on every rank; return every rank's result, or raise the same
        `CheckpointFailedError` on every rank if any rank failed (one all-gather). `done` says
        what a failure leaves behind (default: a save's)."""
        local_error: Exception | None = None
        try:
            outcome: tuple[str | None, Any] = (None, fn(*args))
        except Exception as error:
            local_error, outcome = error, (f"{type(error).__name__}: {error}", None)
        outcomes: list[tuple[str | None, Any] | None] = [None] * self.world.world_size
        dist.all_gather_object(outcomes, outcome)
        failed = {rank: o[0] for rank, o in enumerate(outcomes) if o is not None and o[0]}
        if failed:
            where = "; ".join(f"rank {rank}: {message}" for rank, message in failed.items())
            consequence = done or "nothing was renamed into place and earlier checkpoints are kept"
            raise CheckpointFailedError(
                f"could not {what} ({where}); {consequence}"
            ) from local_error
        return [o[1] for o in outcomes if o is not None]

    # -- weights -----------------------------------------------------------------------------------

    def _get_weights(self) -> dict[str, torch.Tensor]:
        """The full state dict, gathered over ranks onto CPU, on rank 0 (`{}` on the others)."""
        self._touch(COLLECTIVES)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=options)
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

    def _sampler_weights(self) -> WeightUpdate:
        """Every rank's own full copy on CPU: each rank's rollout engine needs the whole model
        (a LoRA backend's: the adapters alone, gathered)."""
        self._touch(COLLECTIVES)
        lora = is_lora_model(self.model)
        options = StateDictOptions(
            full_state_dict=True, cpu_offload=False, ignore_frozen_params=lora
        )
        full = get_model_state_dict(self.model, options=options)  # gathered on each device
        if lora:
            return adapter_update(self.model, full)
        return WeightUpdate(
            tensors={name: tensor.detach().to("cpu", copy=True) for name, tensor in full.items()}
        )

    def _export_hf(self, path: Path, adapter_only: bool) -> Path:
        require_save_pretrained(self.model)  # before the gather: refuse a model without it
        full_state = self._get_weights()  # collective: every rank takes part
        self._worker.settle()  # from here a failure is agreed on by every rank
        # transformers names the class without the "FSDP" prefix that fully_shard adds.
        write = partial(
            write_hf_directory,
            path,
            self.model,
            self.tokenizer,
            adapter_only=adapter_only,
            state_dict=full_state,
        )
        self._agree("write the Hugging Face directory", write, done="nothing was exported")
        return path


# -- pure pieces -----------------------------------------------------------------------------------


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


def _nothing(*_: Any) -> None:
    return None


def _check_checkpoint_files(path: Path, rank: int) -> None:
    required = (path / META_FILE, path / DCP_DIR / ".metadata", path / _rank_file(rank))
    missing = [str(file) for file in required if not file.is_file()]
    if missing:
        raise FileNotFoundError(f"not a checkpoint directory: {path} (missing {missing})")
