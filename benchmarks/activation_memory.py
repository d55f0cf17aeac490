"""Peak memory and step time with and without activation checkpointing, on one device.

A SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads, 3 KV heads, vocab 49,152; random
init, built from a config) trains `--steps` steps of `--batch` x `--length` tokens through
`create_pytorch_backend`, once with `activation_checkpointing=False` and once with True, each in a
fresh child process so that its peak resident memory (`ru_maxrss`) is its own. Printed: each
child's peak RSS, its RSS before the first step (model and optimizer built, so the difference is
what training adds), the median step time, and the ratios checkpointed / plain.

    python benchmarks/activation_memory.py [--steps 3] [--batch 4] [--length 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip


def child(model_dir: str, checkpointing: bool, steps: int, batch: int, length: int) -> None:
    """One measurement, printed as JSON on stdout."""
    import psutil
    import torch

    from rollouts.training.backends import create_pytorch_backend

    with tempfile.TemporaryDirectory() as checkpoints:
        backend = create_pytorch_backend(
            model_dir, checkpoints, device_type="cpu", learning_rate=1e-4,
            activation_checkpointing=checkpointing,
        )  # fmt: skip
        ids = torch.randint(0, SHAPE["vocab_size"], (batch, length))
        labels = torch.roll(ids, -1, dims=1)
        rss_before_mb = psutil.Process().memory_info().rss / 2**20
        times = []
        with backend:
            for _ in range(steps):
                start_s = time.perf_counter()
                backend.forward_backward({"input_ids": ids, "labels": labels})
                backend.optim_step().wait(600)
                times.append(time.perf_counter() - start_s)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mb": peak_mb, "before_mb": rss_before_mb,
                      "step_s": statistics.median(times)}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "1", args.steps, args.batch, args.length)
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = LlamaConfig(max_position_embeddings=max(2048, args.length), **SHAPE)
        LlamaForCausalLM(config).save_pretrained(tmp)
        figures = {}
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--child", tmp, str(int(checkpointing)),
                       "--steps", str(args.steps), "--batch", str(args.batch),
                       "--length", str(args.length)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            figures[checkpointing] = json.loads(done.stdout.strip().splitlines()[-1])
    plain, checkpointed = figures[False], figures[True]
    for name, f in (("plain", plain), ("activation checkpointing", checkpointed)):
        print(
            f"{name:25s} peak RSS {f['peak_mb']:8.0f} MiB (training adds "
            f"{f['peak_mb'] - f['before_mb']:6.0f} MiB), step {f['step_s']:.2f} s"
        )
    added = (checkpointed["peak_mb"] - checkpointed["before_mb"]) / (
        plain["peak_mb"] - plain["before_mb"]
    )
    slower = checkpointed["step_s"] / plain["step_s"]
    print(
        f"checkpointed / plain: peak RSS {checkpointed['peak_mb'] / plain['peak_mb']:.3f}, "
        f"memory training adds {added:.3f}, step time {slower:.2f}"
    )


if __name__ == "__main__":
    main()
