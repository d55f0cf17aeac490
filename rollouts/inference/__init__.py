"""Rollout engines: sample completions (with exact log-probs) from a snapshot of the policy."""

from rollouts.inference.hf_engine import EngineProcessError, EngineTimeoutError, HFRolloutEngine
from rollouts.inference.protocol import Completion, RolloutEngine, SamplingParams

__all__ = [
    "Completion",
    "EngineProcessError",
    "EngineTimeoutError",
    "HFRolloutEngine",
    "RolloutEngine",
    "SamplingParams",
]
