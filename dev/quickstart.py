"""Fine-tune a tiny Llama (built from a config, nothing downloaded) on a copy task through the
backend, with calls queued one step ahead and awaited under asyncio or trio.

    python dev/quickstart.py              # asyncio
    python dev/quickstart.py --trio       # the same loop under trio
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollouts.training.backends import create_backend_with_scheduler

NUM_STEPS = 200
BATCH_SIZE = 16
HALF_LEN = 16  # each sequence is random tokens followed by the same tokens again
VOCAB_SIZE = 64


def copy_task_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The second half repeats the first, so only its tokens are predictable: label those."""
    first_half = torch.randint(1, VOCAB_SIZE, (BATCH_SIZE, HALF_LEN), generator=generator)
    tokens = torch.cat([first_half, first_half], dim=1)
    labels = tokens[:, 1:].clone()
    labels[:, : HALF_LEN - 1] = -100
    return {"input_ids": tokens[:, :-1], "labels": labels}


async def train(model_dir: Path, checkpoint_dir: Path) -> None:
    backend, _ = create_backend_with_scheduler(
        model_dir,
        checkpoint_dir,
        num_training_steps=NUM_STEPS,
        warmup_ratio=0.1,
        device_type="cpu",
        dtype="float32",
        learning_rate=3e-3,
        num_threads="auto",  # 1 intra-op thread when other processes keep the cores busy
    )
    generator = torch.Generator().manual_seed(0)
    start_s = time.perf_counter()
    with backend:
        pending = None  # the previous step's futures: queue step k+1 before awaiting step k
        for step in range(NUM_STEPS + 1):
            submitted = None
            if step < NUM_STEPS:
                submitted = (
                    backend.forward_backward(copy_task_batch(generator)),
                    backend.optim_step(),
                )
            if pending is not None:
                loss = (await pending[0])["loss"]
                stepped = await pending[1]
                if stepped["step"] % 20 == 0 or stepped["step"] == 1:
                    print(
                        f"step {stepped['step']:3d}  loss {loss:.3f}  lr {stepped['lr']:.2e}  "
                        f"grad_norm {stepped['grad_norm']:.2f}"
                    )
            pending = submitted
        path = await backend.save_checkpoint(NUM_STEPS)
    print(f"{NUM_STEPS} steps in {time.perf_counter() - start_s:.1f} s; checkpoint at {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trio", action="store_true", help="run the loop under trio")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=2 * HALF_LEN,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny_llama"
        LlamaForCausalLM(config).save_pretrained(model_dir)
        if args.trio:
            import trio

            trio.run(train, model_dir, Path(tmp) / "checkpoints")
        else:
            asyncio.run(train(model_dir, Path(tmp) / "checkpoints"))


if __name__ == "__main__":
    main()
