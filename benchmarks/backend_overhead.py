"""Overhead of the backend's futures and worker thread against a plain PyTorch loop.

Both loops train the same tiny Llama (hidden 128, 4 layers, vocab 512; batch 8 x 128, fp32) with
the same fused AdamW, clipping and token-mean cross-entropy, and the same forward (no KV cache), so
the ratio isolates what the futures and the worker thread cost. Rounds alternate between the two so
that machine noise hits both alike; the ratio of medians is printed (target <= 1.03 on CPU).

    python benchmarks/backend_overhead.py [--steps 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _tiny_model import build_tiny_llama, random_batches

from rollouts.training import PyTorchTrainingBackend
from rollouts.training.backends import create_adamw_optimizer, create_cross_entropy_loss

BATCH_SIZE, SEQ_LEN, VOCAB_SIZE = 8, 128, 512


def time_plain_loop(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]]
) -> float:
    start = time.perf_counter()
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # as the backend
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the backend reports the loss as a float; so does this loop
    return (time.perf_counter() - start) / len(batches)


def time_backend(backend: PyTorchTrainingBackend, batches: list[dict[str, torch.Tensor]]) -> float:
    start = time.perf_counter()
    futures = []
    for batch in batches:  # queue a step ahead, as a pipelined loop does
        futures.append((backend.forward_backward(batch), backend.optim_step()))
        if len(futures) > 1:
            futures.pop(0)[1].wait()
    futures[-1][1].wait()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per loop, interleaved")
    args = parser.parse_args()
    batches = random_batches(args.steps, BATCH_SIZE, SEQ_LEN, VOCAB_SIZE)

    plain_model = build_tiny_llama(VOCAB_SIZE)
    plain_optimizer = create_adamw_optimizer(plain_model, 1e-4)
    backend_model = build_tiny_llama(VOCAB_SIZE)
    backend = PyTorchTrainingBackend(
        backend_model,
        create_adamw_optimizer(backend_model, 1e-4),
        create_cross_entropy_loss(),
        Path(tempfile.mkdtemp()),
        "cpu",
    )
    time_plain_loop(plain_model, plain_optimizer, batches[:3])  # warm-up both
    time_backend(backend, batches[:3])
    plain_s, backend_s = [], []
    for _ in range(args.rounds):
        plain_s.append(time_plain_loop(plain_model, plain_optimizer, batches))
        backend_s.append(time_backend(backend, batches))
    backend.close()
    plain_median, backend_median = statistics.median(plain_s), statistics.median(backend_s)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {BATCH_SIZE}x{SEQ_LEN}, {args.steps} steps x {args.rounds} rounds"
    )
    print(f"plain loop: {1e3 * plain_median:.1f} ms/step (median)")
    print(f"backend:    {1e3 * backend_median:.1f} ms/step (median)")
    print(f"ratio backend/plain: {backend_median / plain_median:.3f}")


if __name__ == "__main__":
    main()
