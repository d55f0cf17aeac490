"""The micro-batch size finder on CPU: it fits the rows into a memory budget from measured
peaks, the chosen batch then runs within that budget, and the backend is left as it was."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch
import trio
from conftest import VOCAB_SIZE

from rollouts.sft.batch_size import _PeakRSS, find_micro_batch_size
from rollouts.training.backends import create_pytorch_backend

LENGTH = 1024  # long rows, so each one costs megabytes of logits and activations


def make_batch(rows: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB_SIZE, (rows, LENGTH), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}


def test_the_rows_fit_the_budget_and_the_backend_is_untouched(tiny_model_dir: Path, tmp_path):
    with create_pytorch_backend(tiny_model_dir, tmp_path, device_type="cpu") as backend:
        before = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
        rss_mb = psutil.Process().memory_info().rss / 2**20
        budget_mb = rss_mb + 96
        result = trio.run(
            lambda: find_micro_batch_size(backend, make_batch, memory_budget_mb=budget_mb)
        )
        assert result.method.startswith("cpu") and result.per_row_mb > 0.5
        assert 2 <= result.rows < 1024, result
        with _PeakRSS(psutil.Process()) as peak:  # the chosen batch, measured on its own
            backend.forward_backward(make_batch(result.rows)).wait(120)
            backend.discard_gradients().wait(60)
        # RSS peaks scatter between runs by a few percent of the headroom (the allocator keeps
        # what earlier probes freed): the chosen batch stays within a quarter of it.
        assert peak.mb <= budget_mb + 0.25 * (budget_mb - rss_mb), (peak.mb, budget_mb, result)
        after = dict(backend.model.named_parameters())
        assert all(torch.equal(before[n], after[n]) for n in before), "no step was taken"
        assert backend.step == 0
        with pytest.raises(ValueError, match="not even one row fits"):
            trio.run(lambda: find_micro_batch_size(backend, make_batch, memory_budget_mb=1.0))
