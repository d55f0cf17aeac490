"""From groups of trajectories to training batches: advantages, filters, padding.

A group is the G trajectories of one prompt. Its advantages are the rewards centred on the group
mean (optionally divided by the group's standard deviation), so the policy is pushed towards the
better answers to the same question. A group whose rewards are all equal has zero advantage
everywhere and teaches nothing; it can be dropped before it costs a forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rollouts.tasks.episodes import Trajectory
from rollouts.training.losses import IGNORE_INDEX

__all__ = [
    "Group",
    "build_micro_batches",
    "classify_group",
    "group_advantages",
    "split_by_staleness",
]

STD_EPS = 1e-6


@dataclass(frozen=True)
class Group:
    """The G trajectories sampled for one prompt at one step."""

    prompt_index: int
    trajectories: tuple[Trajectory, ...]

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]

    @property
    def weight_version(self) -> int:
        return min(t.weight_version for t in self.trajectories)


def group_advantages(rewards_G: Sequence[float], normalize_by_std: bool) -> list[float]:
    """r - mean(r), divided by std(r) + 1e-6 when asked (population std)."""
    if not rewards_G:
        raise ValueError("a group needs at least one reward")
    mean = sum(rewards_G) / len(rewards_G)
    centred = [r - mean for r in rewards_G]
    if not normalize_by_std:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / len(centred))
    return [c / (std + STD_EPS) for c in centred]


def classify_group(rewards_G: Sequence[float], success_reward: float) -> str:
    """ "all_correct" if every reward >= success_reward, "all_wrong" if none is, else "mixed"."""
    correct = [r >= success_reward for r in rewards_G]
    if all(correct):
        return "all_correct"
    return "mixed" if any(correct) else "all_wrong"


def split_by_staleness(
    groups: Sequence[Group], trainer_version: int, max_steps_off_policy: int
) -> tuple[list[Group], list[Group]]:
    """(fresh, stale): stale groups were sampled more than `max_steps_off_policy` versions ago."""
    fresh = [g for g in groups if trainer_version - g.weight_version <= max_steps_off_policy]
    stale = [g for g in groups if trainer_version - g.weight_version > max_steps_off_policy]
    return fresh, stale


def build_micro_batches(
    trajectories: Sequence[Trajectory],
    advantages: Sequence[float],
    micro_batch_size: int,
    pad_token_id: int,
    temperature: float = 1.0,
) -> list[dict[str, Any]]:
    """Backend batches: labels are the next tokens, weighted only where the policy generated them.

    Each batch holds `input_ids`, `labels`, `loss_mask`, `advantages` and `sampling_logprobs`,
    all [B, T] and aligned with the logits, right-padded within the micro-batch, and
    `temperature`, the one the samples were drawn at: the trainer's log-probs are then those of
    softmax(logits / T), the distribution the sampler's log-probs describe.
    """
    if len(trajectories) != len(advantages):
        raise ValueError(f"{len(trajectories)} trajectories but {len(advantages)} advantages")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (the sampling temperature), got {temperature}")
    batches = []
    for start in range(0, len(trajectories), micro_batch_size):
        chunk = range(start, min(start + micro_batch_size, len(trajectories)))
        batch = _pad_batch(
            [trajectories[i] for i in chunk], [advantages[i] for i in chunk], pad_token_id
        )
        batches.append(batch | {"temperature": temperature})
    return batches


def _pad_batch(
    trajectories: Sequence[Trajectory], advantages: Sequence[float], pad_token_id: int
) -> dict[str, torch.Tensor]:
    length_T = max(len(t.token_ids) for t in trajectories) - 1
    size_B = len(trajectories)
    input_ids = torch.full((size_B, length_T), pad_token_id, dtype=torch.long)
    labels = torch.full((size_B, length_T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((size_B, length_T), dtype=torch.long)
    loss_mask = torch.zeros((size_B, length_T), dtype=torch.float32)
    sampling_logprobs = torch.zeros((size_B, length_T), dtype=torch.float32)
    for row, trajectory in enumerate(trajectories):
        tokens = torch.tensor(trajectory.token_ids, dtype=torch.long)
        n = len(tokens) - 1
        input_ids[row, :n] = tokens[:-1]
        labels[row, :n] = tokens[1:]
        attention_mask[row, :n] = 1
        # Position t predicts token t+1: its weight and sampler log-prob are those of token t+1.
        loss_mask[row, :n] = torch.tensor(trajectory.generated_mask[1:], dtype=torch.float32)
        sampling_logprobs[row, :n] = torch.tensor(trajectory.sampling_logprobs[1:])
    advantages_BT = torch.tensor(advantages, dtype=torch.float32)[:, None] * loss_mask
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "advantages": advantages_BT,
        "sampling_logprobs": sampling_logprobs,
    }
