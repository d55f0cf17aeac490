"""Supervised fine-tuning over any `TrainingBackend`: `SFTTrainingConfig` and `run_sft_training`."""

from rollouts.sft.train import SFTResult, SFTTrainingConfig, count_sft_steps, run_sft_training

__all__ = ["SFTResult", "SFTTrainingConfig", "count_sft_steps", "run_sft_training"]
