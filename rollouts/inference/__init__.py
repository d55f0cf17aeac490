"""Rollout engines: sample completions (with exact log-probs) from a snapshot of the policy."""

from rollouts.inference.hf_engine import HFRolloutEngine
from rollouts.inference.protocol import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "HFRolloutEngine", "RolloutEngine", "SamplingParams"]
