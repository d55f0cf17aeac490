"""Checkpoint directories that appear whole or not at all, and the RNG state they carry.

A checkpoint is a directory `step_00000042/` under the backend's checkpoint root. It is written
under a hidden temporary name, flushed to disk, and renamed into place: a crash mid-save leaves a
`.tmp-*` directory (ignored, and removed by the next save) and never a half-written `step_*`.
Re-saving an existing step moves the old directory aside first and deletes it only after the new
one is in place; a crash between the two renames is repaired by the next save of that step (the old
directory is put back, or dropped if the new one arrived). A deleted checkpoint is renamed away
first (`.deleting-*`) and removed after, so a crash mid-delete never leaves a half-removed
`step_*`; the next save clears it.

Every file of a checkpoint is listed in `checksums.json` with its SHA-256, written last;
`verify_checksums` recomputes them before a load, so a checkpoint damaged on disk (truncated, or
bytes zeroed) is refused by name before any weight is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rollouts.training.errors import CorruptCheckpointError

__all__ = [
    "CHECKSUM_FILE",
    "TRAINED_ONLY",
    "CorruptCheckpointError",
    "abort_directory",
    "atomic_directory",
    "begin_directory",
    "capture_rng_state",
    "checkpoint_path",
    "commit_directory",
    "delete_directory",
    "find_latest_checkpoint",
    "list_checkpoints",
    "restore_rng_state",
    "step_of",
    "verify_checksums",
    "write_checksums",
]

TRAINED_ONLY = "trained"  # meta.json "weights": the model file holds only the trained (LoRA) ones

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
CHECKSUM_FILE = "checksums.json"
_HASH_CHUNK_BYTES = 1 << 22


def checkpoint_path(checkpoint_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(checkpoint_dir) / f"step_{step:08d}"


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Finished checkpoints under `checkpoint_dir`, oldest step first (temporaries excluded)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found)]


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory's name, or None for any other name."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def find_latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The finished checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(checkpoint_dir)
    return checkpoints[-1] if checkpoints else None


@contextmanager
def atomic_directory(final_path: Path) -> Iterator[Path]:
    """Yield a temporary directory; on a clean exit, fsync it and rename it to `final_path`."""
    tmp_path = begin_directory(final_path)
    try:
        yield tmp_path
    except BaseException:
        abort_directory(tmp_path)
        raise
    commit_directory(tmp_path, final_path)


def begin_directory(final_path: Path) -> Path:
    """A fresh temporary directory beside `final_path` (after repairing earlier crashes)."""
    parent = final_path.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".tmp-{final_path.name}-*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    for deleting in parent.glob(".deleting-step_*"):  # a crash mid-delete of a checkpoint
        shutil.rmtree(deleting, ignore_errors=True)
    for aside in parent.glob(f".old-{final_path.name}-*"):  # a crash between the two renames
        if final_path.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:  # the old checkpoint was moved aside and the new one never arrived: put it back
            os.rename(aside, final_path)
    tmp_path = parent / f".tmp-{final_path.name}-{uuid.uuid4().hex[:8]}"
    tmp_path.mkdir()
    return tmp_path


def abort_directory(tmp_path: Path) -> None:
    """Remove a temporary directory that will not become a checkpoint."""
    shutil.rmtree(tmp_path, ignore_errors=True)


def commit_directory(tmp_path: Path, final_path: Path) -> None:
    """fsync `tmp_path` and rename it to `final_path`; an old `final_path` goes only after."""
    try:
        _fsync_tree(tmp_path)
    except BaseException:
        abort_directory(tmp_path)
        raise
    parent = final_path.parent
    aside_path = None
    if final_path.exists():
        aside_path = parent / f".old-{final_path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final_path, aside_path)
    try:
        os.rename(tmp_path, final_path)
    except BaseException:
        if aside_path is not None:  # put the old checkpoint back under its name
            os.rename(aside_path, final_path)
        abort_directory(tmp_path)
        raise
    _fsync_dir(parent)
    if aside_path is not None:
        shutil.rmtree(aside_path, ignore_errors=True)


def delete_directory(path: Path) -> None:
    """Remove a checkpoint so that no crash leaves half of it under its own name."""
    if not path.exists():
        return
    doomed = path.parent / f".deleting-{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def write_checksums(root: Path) -> None:
    """`checksums.json`: the SHA-256 of every file under `root` (relative paths)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
    digests = {str(p.relative_to(root)): _sha256(p) for p in files}
    (root / CHECKSUM_FILE).write_text(json.dumps(digests, indent=1, sort_keys=True))


def verify_checksums(root: Path) -> None:
    """Raise `CorruptCheckpointError` naming the first file that is missing or differs.

    A checkpoint written before checksums existed (no `checksums.json`) passes unchecked."""
    listing = root / CHECKSUM_FILE
    if not listing.is_file():
        return
    try:
        digests = json.loads(listing.read_text())
    except ValueError as error:
        raise CorruptCheckpointError(f"{listing} is not valid JSON ({error})") from None
    for relative, digest in digests.items():
        path = root / relative
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint {root} is missing {relative}")
        if _sha256(path) != digest:
            raise CorruptCheckpointError(
                f"checkpoint {root}: {relative} does not match its recorded SHA-256 (the file was "
                "damaged or changed after the save); it was not loaded"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
