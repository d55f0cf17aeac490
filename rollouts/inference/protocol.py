"""The rollout-engine contract: `SamplingParams`, `Completion` and the `RolloutEngine` protocol.

An engine samples completions for token-id prompts (the caller applies any chat template) and
holds a snapshot of some version of the policy's weights. Every call returns a `TrainFuture` at
once, so an RL loop can `await` sampling under asyncio or trio while the trainer computes; calls
run in submission order, so `sample` queued after `load_weights(sd, v)` uses version v.

Log-probabilities: `Completion.logprobs[i]` is log q(token_i), where q is the distribution the
token was actually drawn from: the model's next-token logits divided by the temperature, restricted
to the top-k tokens and then to the top-p nucleus, renormalised. With temperature 0 (greedy) q is a
point mass on the argmax and every log-prob is 0. These are the `sampling_logprobs` an RL loss
compares the trainer's log-probs against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from rollouts.core.futures import TrainFuture
from rollouts.core.weights import WeightUpdate

__all__ = ["FINISH_REASONS", "Completion", "RolloutEngine", "SamplingParams"]

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample. `top_k=-1` and `top_p=1.0` switch those filters off; `temperature=0` is
    greedy. Same `seed` + same weights + same prompts (and the same engine settings) give the same
    samples; `seed=None` draws a fresh seed per call. `stop` strings end a completion (see
    `Completion.text`)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    stop: tuple[str, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"SamplingParams.max_tokens must be an int, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(
                f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"SamplingParams.top_k must be an int, got {self.top_k!r}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        self._validate_stop()
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            raise ValueError(f"SamplingParams.seed must be None or an int >= 0, got {self.seed!r}")

    def _validate_stop(self) -> None:
        if self.stop is None:
            return
        if isinstance(self.stop, str):
            raise ValueError(
                f"SamplingParams.stop must be a tuple of strings, got the string {self.stop!r}; "
                f"write stop=({self.stop!r},)"
            )
        if not isinstance(self.stop, Sequence):
            raise ValueError(f"SamplingParams.stop must be a tuple of strings, got {self.stop!r}")
        if isinstance(self.stop, list):  # frozen: normalise a list to the declared tuple
            object.__setattr__(self, "stop", tuple(self.stop))
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise ValueError(
                    f"SamplingParams.stop must hold non-empty strings, got {stop!r} in {self.stop}"
                )


@dataclass(frozen=True)
class Completion:
    """One sampled completion.

    `token_ids` are the generated tokens only: EOS is included when it was sampled, and after a
    stop string every token up to and including the one that completed it (the model did sample
    them, so they and their `logprobs` are what a trainer should score). `text` is the decoded
    generated text without special tokens, cut just before the first stop string when one ended
    the completion. `finish_reason` is "stop" (EOS or a stop string) or "length" (max_tokens).
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    weight_version: int


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples completions from a snapshot of the policy; see the module docstring."""

    def sample(
        self, prompts: Sequence[Sequence[int]], num_samples: int, params: SamplingParams
    ) -> TrainFuture[list[list[Completion]]]:
        """`num_samples` completions for each prompt, as result[prompt_index][sample_index]."""
        ...

    def load_weights(
        self, weights: WeightUpdate | Mapping[str, torch.Tensor], version: int
    ) -> TrainFuture[None]:
        """Make the engine's weights a copy of `weights` (taken now) labelled `version`.

        `weights` is a `WeightUpdate` (applied as its `kind` says; a kind the engine cannot apply
        is refused with ValueError naming it) or a plain state dict, taken as kind "full".
        """
        ...

    @property
    def weight_version(self) -> int:
        """The version the next queued `sample` call will use."""
        ...

    def close(self) -> None:
        """Finish queued work and release threads or processes."""
        ...
