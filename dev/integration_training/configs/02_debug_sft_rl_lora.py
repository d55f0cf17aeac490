"""The 01 recipe (SFT, then RL, on 2-digit addition, CPU) with LoRA adapters instead of full
fine-tuning: rank 32 on every attention and MLP linear layer, the LM head and the embedding.

Adapters train about half the parameters of this tiny model (on a 135M-parameter model rank 16 is
under 5%) and learn faster per step at a larger learning rate, so both stages take the 01 stage's
steps at 4x its rate. Each stage exports its model merged; the RL stage starts a fresh adapter on
the merged SFT model and receives, after each step, only the adapters in its rollout engine.
"""

import dataclasses
import runpy
from pathlib import Path

from train_config import LoRAConfig

HERE = Path(__file__).resolve().parent
full = runpy.run_path(str(HERE / "01_debug_sft_rl.py"))["config"]

config = dataclasses.replace(
    full,
    lora=LoRAConfig(rank=32, alpha=64.0, lm_head=True, embeddings=True),
    sft=dataclasses.replace(full.sft, learning_rate=4 * full.sft.learning_rate),
    rl=dataclasses.replace(full.rl, learning_rate=4 * full.rl.learning_rate),
    output_dir="runs/02_debug_sft_rl_lora",
)
