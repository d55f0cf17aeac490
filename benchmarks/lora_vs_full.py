"""LoRA against full fine-tuning on one device: step time, trainable parameters, optimizer bytes,
checkpoint bytes and weight-sync time, printed as ratios LoRA / full from one run.

Two models built from configs (random init, nothing downloaded): the tiny Llama of the shipped
configs (hidden 128, 4 layers) and a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads,
3 KV heads, vocab 49,152). For each, a full backend and a LoRA backend (`--rank`, every attention
and MLP linear layer) from `create_pytorch_backend` train `--steps` steps on the same random
batches after one warm-up step (median step time), save one checkpoint, and hand their weights to
a thread-mode rollout engine (`sampler_weights()` then `load_weights`, median of `--syncs`).
It also times one engine sampling with the adapters merged into plain weights against one running
PEFT's adapter layers (the choice `HFRolloutEngine` makes: merge).
The two backends alternate per step, so machine noise hits both alike.

    python benchmarks/lora_vs_full.py [--steps 5] [--rank 16] [--batch 2] [--length 64]
        [--models tiny 135m]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.inference import HFRolloutEngine, SamplingParams
from rollouts.training.backends import create_pytorch_backend
from rollouts.training.backends.lora import merged_state_dict

MODELS = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=64),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                 tie_word_embeddings=True),
}  # fmt: skip


def _batch(vocab: int, rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return {"input_ids": ids, "labels": labels}


def _optimizer_bytes(backend) -> int:
    states = backend.optimizer.state.values()
    return sum(t.numel() * t.element_size() for s in states for t in s.values() if t.ndim > 0)


def _sync_s(backend, engine: HFRolloutEngine, syncs: int) -> tuple[float, int]:
    times, num_bytes = [], 0
    for version in range(1, syncs + 1):
        start_s = time.perf_counter()
        update = backend.sampler_weights().wait(600)
        engine.load_weights(update, version).wait(600)
        times.append(time.perf_counter() - start_s)
        num_bytes = update.num_bytes
    return statistics.median(times), num_bytes


def _sampling_s(model: torch.nn.Module, tokenizer: object, vocab: int, repeats: int) -> float:
    """Median seconds of one sampling call (8 prompts x 4 samples x 16 tokens)."""
    prompts = [[(7 * i + j) % vocab for j in range(12)] for i in range(8)]
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=0)
    times = []
    with HFRolloutEngine(model, tokenizer, mode="thread", num_threads=None) as engine:
        for _ in range(repeats + 1):
            start_s = time.perf_counter()
            engine.sample(prompts, 4, params).wait(600)
            times.append(time.perf_counter() - start_s)
    return statistics.median(times[1:])  # the first call warms up


def compare_sampling(backend, model_dir: Path, tokenizer: object, vocab: int, repeats: int) -> None:
    """How an engine should apply adapters: merged into plain weights, or as PEFT layers."""
    merged = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged.load_state_dict(merged_state_dict(backend.model))
    merged_s = _sampling_s(merged, tokenizer, vocab, repeats)
    peft_s = _sampling_s(copy.deepcopy(backend.model).eval(), tokenizer, vocab, repeats)
    print(
        f"  sampling (8 x 4 x 16 tokens): merged weights {merged_s:.3f} s, PEFT layers "
        f"{peft_s:.3f} s, PEFT/merged {peft_s / merged_s:.2f}"
    )


def compare(name: str, args: argparse.Namespace, tmp: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=max(64, args.length), **MODELS[name])
    model_dir = tmp / name
    LlamaForCausalLM(config).save_pretrained(model_dir)
    build_char_tokenizer().save_pretrained(model_dir)  # any tokenizer: the engine only loads
    kinds = {"full": {}, "lora": {"lora_rank": args.rank, "lora_alpha": 2.0 * args.rank}}
    backends = {
        kind: create_pytorch_backend(
            model_dir, tmp / f"{name}-{kind}", device_type="cpu", learning_rate=1e-4, **options
        )
        for kind, options in kinds.items()
    }
    step_s: dict[str, list[float]] = {kind: [] for kind in backends}
    for step in range(args.steps + 1):
        batch = _batch(config.vocab_size, args.batch, args.length, step)
        for kind, backend in backends.items():
            start_s = time.perf_counter()
            backend.forward_backward(batch)
            backend.optim_step().wait(600)
            if step:  # the first step warms up (allocations, the fused optimizer's state)
                step_s[kind].append(time.perf_counter() - start_s)
    figures: dict[str, dict[str, float]] = {}
    tokenizer = build_char_tokenizer()
    print(f"\n{name} (lora rank {args.rank}, batch {args.batch} x {args.length} tokens):")
    compare_sampling(backends["lora"], model_dir, tokenizer, config.vocab_size, args.syncs)
    for kind, backend in backends.items():
        path = backend.save_checkpoint(1).wait(600)
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with HFRolloutEngine(base, tokenizer, mode="thread") as engine:
            sync_s, sync_bytes = _sync_s(backend, engine, args.syncs)
        figures[kind] = {
            "step time (s)": statistics.median(step_s[kind]),
            "trainable parameters": sum(
                p.numel() for p in backend.model.parameters() if p.requires_grad
            ),
            "optimizer bytes": _optimizer_bytes(backend),
            "checkpoint bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
            "weight-sync bytes": sync_bytes,
            "weight-sync time (s)": sync_s,
        }
        backend.close()
    for figure in figures["full"]:
        full, lora = figures["full"][figure], figures["lora"][figure]
        print(
            f"  {figure:22s} full {full:14,.4g}   lora {lora:14,.4g}   lora/full {lora / full:.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            compare(name, args, Path(tmp))


if __name__ == "__main__":
    main()
