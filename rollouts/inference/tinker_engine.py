"""`TinkerRolloutEngine`: a rollout engine over the Tinker API's sampling client. It samples the
base model until its first `load_weights`, then the weights a `WeightUpdate` of kind "remote"
names (what `TinkerTrainingBackend.sampler_weights()` saves on the service). Calls run in order
on one worker thread, as on every engine."""

from __future__ import annotations

from typing import Any

from rollouts.core.futures import TrainFuture
from rollouts.core.weights import WeightUpdate
from rollouts.core.worker import SerialWorker
from rollouts.inference.protocol import Completion, SamplingParams

__all__ = ["TinkerRolloutEngine"]

TINKER_HINT = 'the Tinker engine needs the tinker SDK: pip install "rollouts[serve]"'


def _tinker() -> Any:
    try:
        import tinker
    except ImportError as error:
        raise ImportError(TINKER_HINT) from error
    return tinker


class TinkerRolloutEngine:
    """See the module docstring."""

    def __init__(
        self, service_client: Any, base_model: str, tokenizer: Any, call_timeout_s: float = 600.0
    ) -> None:
        self.service_client, self.tokenizer = service_client, tokenizer
        self.call_timeout_s = call_timeout_s  # each sample's bound; past it the call fails
        self._sampler = service_client.create_sampling_client(base_model=base_model)
        self._version = 0
        self._worker = SerialWorker("TinkerRolloutEngine")

    @property
    def weight_version(self) -> int:
        return self._version

    def load_weights(self, weights: WeightUpdate, version: int) -> TrainFuture[None]:
        if not isinstance(weights, WeightUpdate) or weights.kind != "remote":
            raise ValueError("TinkerRolloutEngine.load_weights takes a WeightUpdate of kind "
                             "'remote' (from TinkerTrainingBackend.sampler_weights())")  # fmt: skip
        self._version = version

        def load() -> None:
            self._sampler = self.service_client.create_sampling_client(model_path=weights.location)

        return self._worker.submit("load_weights", load)

    def sample(
        self, prompts: Any, num_samples: int, params: SamplingParams
    ) -> TrainFuture[list[list[Completion]]]:
        version = self._version
        return self._worker.submit(
            "sample", lambda: [self._sample(list(p), num_samples, params, version) for p in prompts]
        )

    def _sample(
        self, prompt: list[int], num_samples: int, params: SamplingParams, version: int
    ) -> list[Completion]:
        tinker = _tinker()
        result = self._sampler.sample(
            prompt=tinker.types.ModelInput.from_ints(prompt),
            num_samples=num_samples,
            sampling_params=tinker.types.SamplingParams(
                max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k,
                top_p=params.top_p, seed=params.seed,
                stop=list(params.stop) if params.stop else None,
            ),
        ).result(timeout=self.call_timeout_s)  # fmt: skip
        completions = []
        for sequence in result.sequences:
            text = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
            for stop in params.stop or ():
                text = text.split(stop)[0]
            completions.append(Completion(
                prompt_token_ids=prompt, token_ids=list(sequence.tokens),
                logprobs=list(sequence.logprobs or []), text=text,
                finish_reason=sequence.stop_reason, weight_version=version,
            ))  # fmt: skip
        return completions

    def close(self) -> None:
        self._worker.close()
