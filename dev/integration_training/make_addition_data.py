"""Write the addition chat data the tiny configs train on; deterministic, so re-running it
reproduces the shipped files byte for byte.

    python dev/integration_training/make_addition_data.py [--out-dir DIR]

Files: addition_train.jsonl, addition_val.jsonl, addition_test.jsonl, one
{"messages": [user "a+b", assistant "a+b's sum"]} per line. The splits come from
`rollouts.tasks.addition`, whose hash split keeps val and test questions out of train.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rollouts.tasks.addition import generate_examples

NUM_DIGITS = 2
SIZES = {"train": 4000, "val": 300, "test": 300}
SEED = 0
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "data"


def write_split(out_dir: Path, split: str, num_examples: int) -> Path:
    path = out_dir / f"addition_{split}.jsonl"
    examples = generate_examples(split, num_examples, SEED, NUM_DIGITS)
    with open(path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps({"messages": example.messages()}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, size in SIZES.items():
        print(write_split(args.out_dir, split, size))


if __name__ == "__main__":
    main()
