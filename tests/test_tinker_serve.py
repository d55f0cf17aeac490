"""`rollouts serve` against the official `tinker` SDK, and nothing else on the client side: the
handshake, LoRA and full training clients, forward_backward / forward with each served loss
(sums checked against a plain PyTorch computation), per-step Adam, futures and seq_id order,
errors with categories, sampler snapshots, save / load with and without the optimizer, a server
restart, the API key, and malformed requests."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

tinker = pytest.importorskip("tinker", reason='needs the tinker SDK: pip install "rollouts[serve]"')
from _serve_helpers import API_KEY, Server, served_model_dir  # noqa: E402
from tinker import types  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from rollouts.data import build_char_tokenizer  # noqa: E402

TOKENS = [5, 6, 7, 8, 9, 10, 11]
WEIGHTS = [0.0, 0.0, 1.0, 1.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return served_model_dir(tmp_path_factory.mktemp("served_model"))


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve_root")
    running = Server(model_dir, root, "--api-key", API_KEY)
    yield running
    running.stop()


def _client(server: Server) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.url, api_key=API_KEY)


def _datum(tokens=TOKENS, weights=WEIGHTS) -> types.Datum:
    inputs = {"target_tokens": tokens[1:], "weights": weights}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def _reference_logprobs(model_dir: Path, tokens=TOKENS) -> torch.Tensor:
    """log p(tokens[i+1] | tokens[:i+1]) under the base model, by transformers directly."""
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_training_and_losses_match_a_plain_computation(server: Server, model_dir: Path) -> None:
    service = _client(server)
    training = service.create_lora_training_client(base_model=str(model_dir), rank=4, seed=0)
    assert training.get_info().model_data.model_name == str(model_dir)
    reference = _reference_logprobs(model_dir)  # LoRA starts as the base model (B = 0)
    forward = training.forward([_datum()], "cross_entropy").result()
    np.testing.assert_allclose(forward.loss_fn_outputs[0]["logprobs"].tolist(), reference,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    expected = -float((reference * torch.tensor(WEIGHTS)).sum())  # a sum, not a mean
    assert forward.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    # RL losses: the sums of their per-token formulas.
    sampling = (reference - 0.1).tolist()
    advantages = [0.0, 0.0, 1.0, -1.0, 2.0, 0.5]
    ratio = torch.exp(reference - torch.tensor(sampling))
    adv = torch.tensor(advantages)
    expected_losses = {
        "importance_sampling": -(ratio * adv).sum(),
        "ppo": -torch.minimum(ratio * adv, ratio.clamp(0.9, 1.05) * adv).sum(),
        "cispo": -(ratio.clamp(0.9, 1.05) * reference * adv).sum(),
        "dro": -(reference * adv - 0.5 * 0.2 * (reference - torch.tensor(sampling)) ** 2).sum(),
    }
    configs = {"ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05},
               "cispo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05},
               "dro": {"beta": 0.2}}  # fmt: skip
    rl_datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "logprobs": sampling,
                        "advantages": advantages},
    )  # fmt: skip
    for loss, value in expected_losses.items():
        result = training.forward([rl_datum], loss, loss_fn_config=configs.get(loss)).result()
        assert result.metrics["loss:sum"] == pytest.approx(float(value), rel=1e-4), loss
    # Queued without waiting: forward_backward, optim_step, forward run in seq_id order.
    futures = [training.forward_backward([_datum()], "cross_entropy"),
               training.optim_step(types.AdamParams(learning_rate=0.05)),
               training.forward([_datum()], "cross_entropy")]  # fmt: skip
    first, step, after = (future.result() for future in futures)
    assert first.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    assert after.metrics["loss:sum"] < first.metrics["loss:sum"], "the step lowered the loss"
    assert step.metrics["learning_rate"] == 0.05
    # A loss we do not serve is a user error naming the supported ones; the model goes on.
    with pytest.raises(tinker.RequestFailedError, match=r"supported: .*cross_entropy") as error:
        training.forward_backward([_datum()], "gspo").result()
    assert error.value.category == types.RequestErrorCategory.User
    again = training.forward([_datum()], "cross_entropy").result()
    assert again.metrics["loss:sum"] == pytest.approx(after.metrics["loss:sum"], rel=1e-6)
    service.close(status="success").result()


def test_full_fine_tuning_equals_torch_adamw_with_the_sent_settings(server, model_dir) -> None:
    service = _client(server)
    training = service.create_lora_training_client(base_model=str(model_dir), rank=0)
    assert training.get_info().is_lora is False
    adam = types.AdamParams(learning_rate=0.01, beta1=0.8, beta2=0.9, eps=1e-6,
                            weight_decay=0.05, grad_clip_norm=0.5)  # fmt: skip
    training.forward_backward([_datum()], "cross_entropy").result()
    training.optim_step(adam).result()
    after = training.forward([_datum()], "cross_entropy").result()
    model = LlamaForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9), eps=1e-6,
                                  weight_decay=0.05)  # fmt: skip
    logits = model(input_ids=torch.tensor([TOKENS[:-1]])).logits[0]
    logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(TOKENS[1:])[:, None])[:, 0]
    (-(logp * torch.tensor(WEIGHTS)).sum()).backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.5)
    optimizer.step()
    expected = _reference_logprobs_of(model)
    np.testing.assert_allclose(after.loss_fn_outputs[0]["logprobs"].tolist(), expected,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    service.close(status="success").result()


def _reference_logprobs_of(model: LlamaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([TOKENS[:-1]])).logits[0]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(TOKENS[1:])[:, None])[:, 0]


def _train(training, steps: int, lr: float = 0.05) -> None:
    # eps well above float noise: Adam at the SDK's default 1e-12 turns a gradient of 1e-9 (a
    # rounding difference) into a full step, so two equal runs could part ways.
    for _ in range(steps):
        training.forward_backward([_datum()], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=lr, eps=1e-4)).result()


def test_samplers_are_snapshots_and_states_load_with_or_without_optimizer(
    server, model_dir, tmp_path
) -> None:
    service = _client(server)
    training = service.create_lora_training_client(base_model=str(model_dir), rank=4)
    _train(training, 2)
    saved = training.save_weights_for_sampler("first").result()
    assert saved.path.endswith("/sampler_weights/first")
    sampler = service.create_sampling_client(model_path=saved.path)
    prompt = types.ModelInput.from_ints(TOKENS)
    before = sampler.compute_logprobs(prompt).result()
    assert before[0] is None and len(before) == len(TOKENS)
    trained = training.forward([_datum()], "cross_entropy").result()
    # The sampler holds the saved weights.
    np.testing.assert_allclose(before[1:], trained.loss_fn_outputs[0]["logprobs"].tolist(),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    state = training.save_state("after-two").result()
    _train(training, 3)
    assert sampler.compute_logprobs(prompt).result() == before, "a snapshot never moves"
    unnamed = training.save_weights_and_get_sampling_client()
    assert unnamed.compute_logprobs(prompt).result() != before
    # Sampling: one sequence per sample, logprobs per token, stop strings and token ids.
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    samples = sampler.sample(prompt=prompt, num_samples=3, sampling_params=params).result()
    assert len(samples.sequences) == 3
    eos = build_char_tokenizer().eos_token_id
    for sequence in samples.sequences:
        assert len(sequence.tokens) == len(sequence.logprobs)
        ended = sequence.tokens[-1] == eos and sequence.stop_reason == "stop"
        assert ended or (len(sequence.tokens) == 6 and sequence.stop_reason == "length")
    again = sampler.sample(prompt=prompt, num_samples=3, sampling_params=params).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in samples.sequences]
    longest = max(samples.sequences, key=lambda sequence: len(sequence.tokens))
    first_token = longest.tokens[1]
    stopped = sampler.sample(
        prompt=prompt, num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=6, seed=3, stop=[first_token]),
    ).result().sequences[0]  # fmt: skip
    assert stopped.tokens == longest.tokens[: longest.tokens.index(first_token) + 1]
    assert stopped.stop_reason == "stop"
    # load_state_with_optimizer puts back weights and Adam's moments: the next step is the one
    # the state would have taken; without the optimizer, the moments start afresh.
    with_optimizer = service.create_training_client_from_state_with_optimizer(state.path)
    without = service.create_training_client_from_state(state.path)
    reference = service.create_lora_training_client(base_model=str(model_dir), rank=4)
    _train(reference, 2)

    _train(reference, 1)  # a third step after the same two steps, moments kept
    for client in (with_optimizer, without):
        loaded = client.forward([_datum()], "cross_entropy").result()
        assert loaded.metrics["loss:sum"] == pytest.approx(trained.metrics["loss:sum"], rel=1e-6)
    _train(with_optimizer, 1)
    _train(without, 1)
    target = reference.forward([_datum()], "cross_entropy").result().metrics["loss:sum"]
    kept = with_optimizer.forward([_datum()], "cross_entropy").result().metrics["loss:sum"]
    fresh = without.forward([_datum()], "cross_entropy").result().metrics["loss:sum"]
    assert kept == pytest.approx(target, rel=1e-5) and fresh != pytest.approx(target, rel=1e-5)
    service.close(status="success").result()


def test_saved_weights_outlive_the_server(model_dir, tmp_path) -> None:
    root = tmp_path / "root"
    first = Server(model_dir, root, "--api-key", API_KEY)
    try:
        service = _client(first)
        training = service.create_lora_training_client(base_model=str(model_dir), rank=4)
        _train(training, 2)
        state = training.save_state("kept").result()
        sampler_path = training.save_weights_for_sampler("kept").result().path
        expected = training.forward([_datum()], "cross_entropy").result().metrics["loss:sum"]
        service.close(status="success").result()
    finally:
        first.stop()
    second = Server(model_dir, root, "--api-key", API_KEY)
    try:
        service = _client(second)
        loaded = service.create_training_client_from_state(state.path)
        assert loaded.forward([_datum()], "cross_entropy").result().metrics[
            "loss:sum"
        ] == pytest.approx(expected, rel=1e-6)
        logprobs = service.create_sampling_client(model_path=sampler_path).compute_logprobs(
            types.ModelInput.from_ints(TOKENS)
        ).result()  # fmt: skip
        assert -sum(w * lp for w, lp in zip(WEIGHTS, logprobs[1:], strict=True)) == pytest.approx(
            expected, rel=1e-4
        )
        service.close(status="success").result()
    finally:
        second.stop()


def test_the_server_refuses_bad_requests_and_lives_on(server: Server, model_dir: Path) -> None:
    api = f"{server.url}/api/v1"
    headers = {"X-API-Key": API_KEY}
    assert httpx.post(f"{api}/client/config", json={}, timeout=10).status_code == 401
    wrong = httpx.post(f"{api}/client/config", json={}, headers={"X-API-Key": "tml-x"}, timeout=10)
    assert wrong.status_code == 401
    garbage = httpx.post(f"{api}/forward_backward", content=b"\x00\xff garbage",
                         headers={**headers, "Content-Type": "application/x-protobuf"},
                         timeout=10)  # fmt: skip
    assert garbage.status_code == 400 and "ForwardBackwardRequest" in garbage.json()["detail"]
    from tinker.proto import tinker_public_pb2 as pb

    wrong_size = pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    datum = wrong_size.data.add()
    datum.model_input.add().encoded_text.tokens = np.arange(3, dtype="<i4").tobytes()
    datum.loss_fn_inputs["target_tokens"].dense = b"\x01\x02\x03"  # not whole int64s
    datum.loss_fn_inputs["target_tokens"].dtype = 2
    odd = httpx.post(f"{api}/forward_backward", content=wrong_size.SerializeToString(),
                     headers={**headers, "Content-Type": "application/x-protobuf"},
                     timeout=10)  # fmt: skip
    assert odd.status_code == 400 and "target_tokens" in odd.json()["detail"]
    not_json = httpx.post(f"{api}/optim_step", content=b"{", headers=headers, timeout=10)
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["detail"]
    unknown = httpx.post(f"{api}/optim_step", json={"model_id": "nope", "seq_id": 1},
                         headers=headers, timeout=10)  # fmt: skip
    assert unknown.status_code == 404 and "unknown model_id" in unknown.json()["detail"]
    wrong_model = httpx.post(f"{api}/create_session", json={}, headers=headers, timeout=10)
    session = wrong_model.json()["session_id"]
    refused = httpx.post(f"{api}/create_model", json={"session_id": session, "model_seq_id": 0,
                         "base_model": "Qwen/Qwen3-8B"}, headers=headers, timeout=10)  # fmt: skip
    assert refused.status_code == 400 and str(model_dir) in refused.json()["detail"]
    huge = httpx.post(f"{api}/asample", content=b"x" * (65 << 20), headers=headers, timeout=60)
    assert huge.status_code == 413
    # A retried submission (same seq_id) gets the future it already has; the stream goes on.
    created = httpx.post(f"{api}/create_model", json={"session_id": session, "model_seq_id": 1,
                         "base_model": str(model_dir), "lora_config": {"rank": 2}},
                         headers=headers, timeout=10).json()  # fmt: skip
    model = _collect(api, headers, created["request_id"])
    assert model["model_id"] == f"{session}:train:1"

    def optim(seq_id: int) -> str:
        body = {"model_id": model["model_id"], "seq_id": seq_id, "type": "optim_step",
                "adam_params": {"learning_rate": 1e-3}}  # fmt: skip
        return httpx.post(f"{api}/optim_step", json=body, headers=headers, timeout=10).json()[
            "request_id"
        ]

    later = optim(2)  # arrives first: waits for seq_id 1
    first, retried = optim(1), optim(1)
    assert first == retried != later
    for request_id in (first, later):
        failed = _collect(api, headers, request_id)
        assert failed["category"] == "user" and "no forward_backward" in failed["error"]
    assert httpx.get(f"{api}/healthz", headers=headers, timeout=10).json() == {"status": "ok"}
    # A finished session's models go (their saved states would stay on disk).
    finished = httpx.post(f"{api}/sessions/{session}/finish", json={}, headers=headers, timeout=30)
    assert finished.status_code == 200
    gone = httpx.post(f"{api}/get_info", json={"model_id": model["model_id"]}, headers=headers,
                      timeout=10)  # fmt: skip
    assert gone.status_code == 404


def _collect(api: str, headers: dict, request_id: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = httpx.post(f"{api}/retrieve_future", json={"request_id": request_id},
                            headers=headers, timeout=40).json()  # fmt: skip
        if answer.get("type") != "try_again":
            return answer
    raise AssertionError(f"{request_id} never finished")
