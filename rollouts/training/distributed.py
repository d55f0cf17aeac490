"""The process group of a `torchrun` job, read once into a `World` value.

    world = init_distributed()          # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    ...                                 # build backends with `world`, train
    log_main(world, "step 10 ...")      # prints on rank 0 only
    destroy_distributed()

gloo serves CPU ranks and NCCL serves CUDA ranks. Every collective of the group waits at most
`timeout_s` (default `TIMEOUT_S_DEFAULT`): a rank that dies or stops answering makes the others
raise within that bound instead of hanging for ever. When a process group already exists (a test
that created it with `torch.multiprocessing.spawn`, a launcher of your own), `init_distributed`
adopts it and leaves its timeout as it was created.

Importing this module initialises nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "TIMEOUT_S_DEFAULT",
    "World",
    "destroy_distributed",
    "init_distributed",
    "log_main",
]

# Long enough for a rank-0-only checkpoint rename or a slow evaluation on one rank while the others
# wait at the next collective; short enough that a dead peer ends the job in minutes, not the
# half hour of gloo's own default.
TIMEOUT_S_DEFAULT = 600.0
DEVICE_TYPES = ("cpu", "cuda")
_BACKEND_FOR_DEVICE = {"cpu": "gloo", "cuda": "nccl"}


@dataclass(frozen=True, kw_only=True)
class World:
    """Where this process sits in the job: its rank, the job's size, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "gloo" or "nccl"
    # The bound on every collective; an adopted group's own timeout is not readable through a
    # public API, so it is taken to be the default (pass a World of your own to say otherwise).
    timeout_s: float = TIMEOUT_S_DEFAULT

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"World.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"World.rank must lie in [0, {self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"World.local_rank must be >= 0, got {self.local_rank}")
        if not self.timeout_s > 0:
            raise ValueError(f"World.timeout_s must be > 0, got {self.timeout_s}")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs, prints and writes single-writer files."""
        return self.rank == 0


def init_distributed(
    *, device_type: str | None = None, timeout_s: float = TIMEOUT_S_DEFAULT
) -> World:
    """Initialise (or adopt) the default process group from the torchrun environment.

    `device_type` "cpu" (gloo) or "cuda" (NCCL, one GPU per local rank); None picks CUDA when this
    machine has it. Raises ValueError naming the variable when the environment is missing or wrong.
    """
    if device_type is not None and device_type not in DEVICE_TYPES:
        raise ValueError(f"Invalid device_type: {device_type!r}. Must be one of {DEVICE_TYPES}")
    if not timeout_s > 0:
        raise ValueError(f"Invalid timeout_s: {timeout_s}. Must be > 0")
    if dist.is_initialized():
        world = _adopt_process_group()
        if device_type is not None and device_type != world.device.type:
            raise ValueError(
                f"device_type={device_type!r}, but the existing process group uses "
                f"{world.backend!r} on {world.device.type!r}"
            )
        return world
    rank, world_size, local_rank = _read_torchrun_env()
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = _device_for(device_type, local_rank)
    backend = _BACKEND_FOR_DEVICE[device_type]
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return World(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=backend,
        timeout_s=timeout_s,
    )


def destroy_distributed() -> None:
    """Tear the default process group down (a no-op when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def log_main(world: World, message: str) -> None:
    """Print `message` on rank 0 only, flushed at once so interleaved rank output stays readable."""
    if world.is_main:
        print(message, flush=True)


def _read_torchrun_env() -> tuple[int, int, int]:
    world_size = _env_int("WORLD_SIZE", minimum=1)
    rank = _env_int("RANK", minimum=0)
    if rank >= world_size:
        raise ValueError(f"environment variable RANK={rank} must be < WORLD_SIZE={world_size}")
    local_rank = _env_int("LOCAL_RANK", minimum=0)
    if local_rank > rank:
        raise ValueError(f"environment variable LOCAL_RANK={local_rank} must be <= RANK={rank}")
    if not os.environ.get("MASTER_ADDR"):
        raise ValueError(
            "environment variable MASTER_ADDR is not set; launch with torchrun, which sets it"
        )
    port = _env_int("MASTER_PORT", minimum=1)
    if port > 65535:
        raise ValueError(f"environment variable MASTER_PORT={port} must lie in [1, 65535]")
    return rank, world_size, local_rank


def _env_int(name: str, *, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        raise ValueError(
            f"environment variable {name} is not set; launch with torchrun "
            "(e.g. torchrun --nproc_per_node=2 script.py), which sets it"
        )
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _device_for(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            "device_type='cuda' was asked for, but CUDA is not available in this torch build "
            f"({torch.__version__}) or machine; use device_type='cpu' (gloo)"
        )
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"environment variable LOCAL_RANK={local_rank}, but this node has only "
            f"{torch.cuda.device_count()} CUDA device(s); lower --nproc_per_node"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _adopt_process_group() -> World:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    backend = str(dist.get_backend())
    raw_local_rank = os.environ.get("LOCAL_RANK")
    local_rank = _env_int("LOCAL_RANK", minimum=0) if raw_local_rank else rank
    if "nccl" in backend:  # "nccl", or "cpu:gloo,cuda:nccl"
        device = _device_for("cuda", local_rank)
    elif backend == "gloo":
        device = torch.device("cpu")
    else:
        raise ValueError(f"the existing process group uses {backend!r}; expected 'gloo' or 'nccl'")
    return World(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend
    )
