"""Reinforcement learning over any `TrainingBackend` and `RolloutEngine`: the RL loop.

Group advantages and batching live in `rollouts.rl.batching`; episodes and the greedy evaluator
in `rollouts.tasks`, one layer down, since the SFT stage evaluates with them too.
"""

from rollouts.rl.train import RLTrainingConfig, run_rl_training

__all__ = ["RLTrainingConfig", "run_rl_training"]
