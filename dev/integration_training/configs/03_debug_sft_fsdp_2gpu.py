"""The SFT run of `00_tiny_sft_cpu.py` sharded over 2 ranks with FSDP2.

    torchrun --nproc_per_node=2 dev/integration_training/train.py \
        dev/integration_training/configs/03_debug_sft_fsdp_2gpu.py

On a machine without GPUs the ranks run on CPU with gloo (`target.device_type="cpu"`); on 2 GPUs
pass `--target.device_type cuda` (NCCL, one GPU per rank). Each rank trains on its half of every
micro-batch, and the backend normalises the loss over both halves, so the run computes what the
single-device run computes (to float32 rounding): the same metrics, checkpoints and plot.
"""

import dataclasses
import runpy
from pathlib import Path

from train_config import TargetConfig

HERE = Path(__file__).resolve().parent
single_device = runpy.run_path(str(HERE / "00_tiny_sft_cpu.py"))["config"]

config = dataclasses.replace(
    single_device,
    target=TargetConfig(device_type="cpu", gpu_ranks=(0, 1), backend="fsdp"),
    output_dir="runs/03_debug_sft_fsdp_2gpu",
)
