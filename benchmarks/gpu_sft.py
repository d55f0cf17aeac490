"""Full SFT on one GPU in bf16: tokens/s, MFU and peak memory, one device and FSDP.

    python benchmarks/gpu_sft.py [--models 135m,0.5b] [--seq-lens 2048,8192]
                                 [--backends single,fsdp] [--tokens-per-step 16384] [--steps 12]
    python benchmarks/gpu_sft.py --smoke        # the same code path, tiny, on the CPU

Models, built from a config with random weights (nothing downloaded): "135m" (SmolLM2-135M's
shape) and "0.5b" (Qwen2.5-0.5B's: hidden 896, 24 layers, 14 heads, 2 KV heads, vocabulary
151,936, tied embeddings). Each step is one optimizer step over `--tokens-per-step` tokens
(rows of `seq_len` random tokens, every position a target, so the LM head runs everywhere and
the model FLOPs below are all spent), split into micro-batches of `--micro-batch-tokens`.

- single: `PyTorchTrainingBackend`, float32 weights and AdamW state, bf16 autocast.
- fsdp: `FSDPTrainingBackend` on a one-process group, FSDP2 mixed precision (bf16 compute,
  float32 reductions), float32 sharded weights.

MFU = achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s (`--peak-tflops`, else looked
up by device name), with model FLOPs per token = 6 * (matmul parameters, the LM head counted
once even when tied) + 12 * layers * hidden * seq_len (attention scores and values, the PaLM
appendix convention, not halved for the causal mask). Time: the median step after
`--warmup` steps, each step waited on (the figures include the optimizer step and the loss
read-back). Peak memory: `torch.cuda.max_memory_allocated` over the timed steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _tiny_model import SMOLLM2_135M_SHAPE
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

MODELS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "135m": (LlamaConfig, LlamaForCausalLM, {**SMOLLM2_135M_SHAPE, "vocab_size": 49152}),
    "0.5b": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
        ),
    ),
    "smoke": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            tie_word_embeddings=True,
        ),
    ),
}
# Dense bf16 peak, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def build_model(name: str, max_positions: int) -> torch.nn.Module:
    config_class, model_class, fields = MODELS[name]
    config = config_class(**fields, max_position_embeddings=max_positions, use_cache=False)
    torch.manual_seed(0)
    return model_class(config)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    config = model.config
    embedding = model.get_input_embeddings().weight
    matmul_params = sum(p.numel() for p in model.parameters()) - embedding.numel()
    matmul_params += config.vocab_size * config.hidden_size  # the head, tied or not
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return 6 * matmul_params + attention


def batches(vocab_size: int, seq_len: int, rows: int, count: int, device: str) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, vocab_size, (rows, seq_len + 1), generator=generator)
        out.append({"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)})
    return out


def make_backend(kind: str, model: torch.nn.Module, device: str, work: Path) -> Any:
    from rollouts.training import PyTorchTrainingBackend
    from rollouts.training.backends import create_adamw_optimizer
    from rollouts.training.losses import cross_entropy_loss

    bf16 = torch.bfloat16
    if kind == "single":
        model = model.to(device)
        optimizer = create_adamw_optimizer(model, 1e-4)
        return PyTorchTrainingBackend(
            model, optimizer, cross_entropy_loss, work, device, autocast_dtype=bf16
        )
    from rollouts.training.backends.fsdp import FSDPTrainingBackend, shard_model
    from rollouts.training.distributed import init_distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    for variable in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(variable, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    world = init_distributed(device_type="cuda" if device.startswith("cuda") else "cpu")
    model = shard_model(model, world, mixed_precision=bf16)
    optimizer = create_adamw_optimizer(model, 1e-4)
    return FSDPTrainingBackend(model, optimizer, cross_entropy_loss, work, world)


def run_case(args: argparse.Namespace, model_name: str, seq_len: int, kind: str) -> dict:
    device = "cpu" if args.smoke else "cuda"
    model = build_model(model_name, max(seq_len, 2048))
    per_token = flops_per_token(model, seq_len)
    rows = max(1, args.micro_batch_tokens // seq_len)
    micro_batches = max(1, args.tokens_per_step // (rows * seq_len))
    data = batches(model.config.vocab_size, seq_len, rows, micro_batches, device)
    step_s: list[float] = []
    with make_backend(kind, model, device, Path(tempfile.mkdtemp())) as backend:
        for step in range(args.warmup + args.steps):
            if step == args.warmup and device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for batch in data:
                backend.forward_backward(batch)
            backend.optim_step().wait(600)
            step_s.append(time.perf_counter() - start)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    seconds = statistics.median(step_s[args.warmup :])
    tokens_per_s = rows * seq_len * micro_batches / seconds
    return {"tokens_per_s": tokens_per_s, "flops": tokens_per_s * per_token, "peak_gib": peak_gib}


def peak_flops(args: argparse.Namespace) -> float:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.smoke:
        return 1e12  # a nominal figure: the smoke run checks the code path, not the speed
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16, TFLOP/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="135m,0.5b")
    parser.add_argument("--seq-lens", default="2048,8192")
    parser.add_argument("--backends", default="single,fsdp")
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.seq_lens, args.steps, args.warmup = "smoke", "64", 2, 1
        args.tokens_per_step = args.micro_batch_tokens = 256
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (--smoke checks it on CPU)")
    peak = peak_flops(args)
    where = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"{where}, peak {peak / 1e12:.0f} TFLOP/s bf16, torch {torch.__version__}")
    for model_name in args.models.split(","):
        for seq_len in (int(s) for s in args.seq_lens.split(",")):
            for kind in args.backends.split(","):
                result = run_case(args, model_name, seq_len, kind)
                print(
                    f"{model_name:>5} seq {seq_len:>5} {kind:>6}: "
                    f"{result['tokens_per_s']:10.0f} tokens/s, "
                    f"MFU {result['flops'] / peak:6.1%}, peak {result['peak_gib']:.1f} GiB",
                    flush=True,
                )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
