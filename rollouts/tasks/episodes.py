"""Running episodes: a batch of environments driven turn by turn through a rollout engine.

Every environment starts from its chat messages, rendered with the tokenizer's chat template.
Each turn, the still-running episodes are sampled together in one `engine.sample` call, and each
environment answers its assistant message. The resulting `Trajectory` keeps the exact tokens the
policy saw and produced: the sampled tokens as generated (never re-tokenised), and between turns
the template's rendering of the new user message.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rollouts.inference import Completion, RolloutEngine, SamplingParams
from rollouts.tasks.protocol import Env, maybe_await

__all__ = ["Trajectory", "render_prompt_ids", "run_episodes"]

# Seeds of later turns are offset by a large prime so that turns never share a seed.
TURN_SEED_STRIDE = 1_000_003


@dataclass(frozen=True, kw_only=True)
class Trajectory:
    """One finished episode, in tokens."""

    token_ids: tuple[int, ...]  # prompt, generated tokens and later user turns, in order
    generated_mask: tuple[int, ...]  # 1 where the policy generated the token
    sampling_logprobs: tuple[float, ...]  # the sampler's log-prob where generated, else 0
    reward: float  # the sum of the episode's step rewards
    weight_version: int  # the oldest weight version among its turns
    num_turns: int
    final_text: str  # the last assistant message
    finish_reasons: tuple[str, ...]  # one per turn

    @property
    def num_generated_tokens(self) -> int:
        return sum(self.generated_mask)


def render_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` under the chat template, ready for the assistant to answer."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _next_turn_ids(
    tokenizer: Any, messages: Sequence[dict[str, str]], observation: str
) -> tuple[list[dict[str, str]], list[int]]:
    """Messages after the new user turn, and the template's tokens for that turn alone."""
    base_text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    extended = [*messages, {"role": "user", "content": observation}]
    full_text = tokenizer.apply_chat_template(extended, add_generation_prompt=True, tokenize=False)
    if not full_text.startswith(base_text):
        raise ValueError(
            "the chat template does not render a conversation as a prefix of its continuation; "
            "multi-turn episodes need an append-only template"
        )
    suffix_ids = tokenizer(full_text[len(base_text) :], add_special_tokens=False)["input_ids"]
    return extended, list(suffix_ids)


@dataclass
class _Episode:
    env: Env
    messages: list[dict[str, str]]
    token_ids: list[int]
    generated_mask: list[int]
    sampling_logprobs: list[float]
    reward: float = 0.0
    versions: list[int] = dataclasses.field(default_factory=list)
    finish_reasons: list[str] = dataclasses.field(default_factory=list)
    final_text: str = ""
    done: bool = False

    def to_trajectory(self) -> Trajectory:
        return Trajectory(
            token_ids=tuple(self.token_ids),
            generated_mask=tuple(self.generated_mask),
            sampling_logprobs=tuple(self.sampling_logprobs),
            reward=self.reward,
            weight_version=min(self.versions),
            num_turns=len(self.versions),
            final_text=self.final_text,
            finish_reasons=tuple(self.finish_reasons),
        )


async def run_episodes(
    engine: RolloutEngine,
    tokenizer: Any,
    envs: Sequence[Env],
    params: SamplingParams,
    max_turns: int = 1,
) -> list[Trajectory]:
    """Run every environment to its end (or `max_turns` assistant messages); keep the order."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    episodes = []
    for env in envs:
        messages = list(env.initial_messages())
        prompt_ids = render_prompt_ids(tokenizer, messages)
        episodes.append(
            _Episode(env, messages, prompt_ids, [0] * len(prompt_ids), [0.0] * len(prompt_ids))
        )
    for turn in range(max_turns):
        active = [episode for episode in episodes if not episode.done]
        if not active:
            break
        seed = None if params.seed is None else params.seed + turn * TURN_SEED_STRIDE
        completions = await engine.sample(
            [e.token_ids for e in active], 1, dataclasses.replace(params, seed=seed)
        )
        assert len(completions) == len(active), "the engine answers every prompt"
        for episode, (completion,) in zip(active, completions, strict=True):
            await _advance(episode, completion, tokenizer, is_last_turn=turn == max_turns - 1)
    return [episode.to_trajectory() for episode in episodes]


def _checked_reward(reward: Any, source: Any, text: str) -> float:
    """A finite float, or a ValueError naming the task (or env), the value and the answer."""
    if isinstance(reward, bool) or not isinstance(reward, int | float):
        raise ValueError(
            f"{type(source).__name__} returned reward {reward!r} ({type(reward).__name__}) "
            f"for the answer {text!r}; a reward must be a finite number"
        )
    if not math.isfinite(reward):
        raise ValueError(
            f"{type(source).__name__} returned reward {reward} for the answer {text!r}; a "
            "reward must be a finite number"
        )
    return float(reward)


async def _advance(
    episode: _Episode, completion: Completion, tokenizer: Any, is_last_turn: bool
) -> None:
    assert len(completion.logprobs) == len(completion.token_ids), "one log-prob per token"
    episode.token_ids.extend(completion.token_ids)
    episode.generated_mask.extend([1] * len(completion.token_ids))
    episode.sampling_logprobs.extend(completion.logprobs)
    episode.versions.append(completion.weight_version)
    episode.finish_reasons.append(completion.finish_reason)
    episode.final_text = completion.text
    result = await maybe_await(episode.env.step(completion.text))
    source = getattr(episode.env, "task", episode.env)  # name the user's task, not the wrapper
    episode.reward += _checked_reward(result.reward, source, completion.text)
    if result.done or is_last_turn:
        episode.done = True
        return
    if result.observation is None:
        raise ValueError(
            f"{type(episode.env).__name__}.step returned done=False and no observation"
        )
    episode.messages.append({"role": "assistant", "content": completion.text})
    episode.messages, suffix_ids = _next_turn_ids(tokenizer, episode.messages, result.observation)
    episode.token_ids.extend(suffix_ids)
    episode.generated_mask.extend([0] * len(suffix_ids))
    episode.sampling_logprobs.extend([0.0] * len(suffix_ids))
