"""Whole runs from a config: the training command (`rollouts train`, `rollouts sft`) and its
config schema. The top layer: it assembles tokenizer, data, backends and engines and runs the
orchestrators; nothing below imports it."""
