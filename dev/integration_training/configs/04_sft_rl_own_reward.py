"""The 01 recipe (SFT, then RL) with a reward of one's own: `rl.reward` names a function in
`dev/integration_training/rewards.py` that gives partial credit for digits in the right place.

Any `module:function` or `path/to/file.py:function` works the same way, and `rl.task` names a
task class instead:

    --rl.reward "" --rl.task dev/integration_training/rewards.py:GeneratedAddition

The prompts are the SFT data's user turns; the reference answer a reward compares against is the
record's final assistant turn (`rollouts.data.read_chat_prompts` has the rules).
"""

import dataclasses
import runpy
from pathlib import Path

HERE = Path(__file__).resolve().parent
sft_then_rl = runpy.run_path(str(HERE / "01_debug_sft_rl.py"))["config"]

config = dataclasses.replace(
    sft_then_rl,
    rl=dataclasses.replace(sft_then_rl.rl, reward=f"{HERE.parent / 'rewards.py'}:digit_credit"),
    output_dir="runs/04_sft_rl_own_reward",
)
