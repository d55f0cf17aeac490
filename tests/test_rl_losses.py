"""RL losses against hand computations (value and gradient wrt the logits), and exact accumulation.

The references below are written out independently of `rollouts.training.losses`: log-probs from
an explicit logsumexp in float64, per-token losses from the formulas, and gradients from the chain
rule d logp_t / d logits_t = onehot(label_t) - softmax(logits_t), so
dL/dlogits_t = (w_t / sum(w)) * f'(logp_t) * (onehot - softmax).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_batch

from rollouts.training import PyTorchTrainingBackend
from rollouts.training.backends import load_hf_model
from rollouts.training.losses import (
    RL_LOSSES,
    cross_entropy_loss,
    make_cispo_loss,
    make_dro_loss,
    make_importance_sampling_loss,
    make_ppo_loss,
    make_rl_loss,
    rl_diagnostics,
)

B, T, V = 2, 5, 7
# Target ratios r = p/q for the valid tokens, with advantages chosen so that every PPO region is
# hit: inside the interval, above it with A > 0 (clipped) and A < 0 (not), below it with A < 0
# (clipped) and A > 0 (not).
RATIOS = [1.0, 1.5, 1.5, 0.5, 0.5, 1.1, 0.9, 2.0]
ADVANTAGES = [0.7, 1.2, -0.8, -1.1, 0.6, -0.4, 1.5, 0.3]


def make_rl_batch(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=generator, dtype=torch.float32)
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, 0] = -100  # ignored by label
    loss_mask = torch.ones(B, T)
    loss_mask[1, 0] = 0.0  # a prompt token
    loss_mask[1, 3] = 0.5  # a fractional weight
    valid = (labels != -100) & (loss_mask > 0)
    assert int(valid.sum()) == len(RATIOS)
    true_logp = hand_logprobs(logits.double(), labels)
    sampling = torch.full((B, T), 1000.0, dtype=torch.float64)  # garbage where ignored
    sampling[valid] = true_logp[valid] - torch.tensor(RATIOS, dtype=torch.float64).log()
    advantages = torch.full((B, T), 99.0)
    advantages[valid] = torch.tensor(ADVANTAGES)
    reference = true_logp + torch.randn(B, T, generator=generator, dtype=torch.float64) * 0.5
    batch = {
        "labels": labels,
        "loss_mask": loss_mask,
        "advantages": advantages,
        "sampling_logprobs": sampling.float(),
        "reference_logprobs": reference.float(),
    }
    return logits, batch


def hand_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    log_normaliser = torch.log(torch.exp(logits).sum(-1))
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - log_normaliser


# Each entry: per-token loss f(logp, s, A, ref) and its derivative wrt logp, as plain formulas.
PerToken = Callable[[float, float, float, float], float]


def clip(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def ppo_f(lp: float, s: float, a: float, _: float) -> float:
    r = math.exp(lp - s)
    return -min(r * a, clip(r, 0.8, 1.2) * a)


def ppo_df(lp: float, s: float, a: float, _: float) -> float:
    r = math.exp(lp - s)
    return -a * r if r * a <= clip(r, 0.8, 1.2) * a else 0.0


CASES: dict[str, tuple[Callable[[], Callable], PerToken, PerToken]] = {
    "importance_sampling": (
        make_importance_sampling_loss,
        lambda lp, s, a, _: -math.exp(lp - s) * a,
        lambda lp, s, a, _: -math.exp(lp - s) * a,
    ),
    "ppo": (make_ppo_loss, ppo_f, ppo_df),
    "cispo": (
        lambda: make_cispo_loss(clip_low=0.8, clip_high=1.2),
        lambda lp, s, a, _: -clip(math.exp(lp - s), 0.8, 1.2) * lp * a,
        lambda lp, s, a, _: -clip(math.exp(lp - s), 0.8, 1.2) * a,
    ),
    "dro": (
        lambda: make_dro_loss(beta=0.3),
        lambda lp, s, a, _: -(lp * a - 0.15 * (lp - s) ** 2),
        lambda lp, s, a, _: -(a - 0.3 * (lp - s)),
    ),
    "ppo+kl": (
        lambda: make_ppo_loss(kl_coef=0.25),
        lambda lp, s, a, ref: ppo_f(lp, s, a, ref) + 0.25 * (math.exp(ref - lp) - (ref - lp) - 1),
        lambda lp, s, a, ref: ppo_df(lp, s, a, ref) + 0.25 * (1 - math.exp(ref - lp)),
    ),
    "cross_entropy+kl": (
        lambda: make_rl_loss("cross_entropy", kl_coef=0.5),
        lambda lp, s, a, ref: -lp + 0.5 * (math.exp(ref - lp) - (ref - lp) - 1),
        lambda lp, s, a, ref: -1 + 0.5 * (1 - math.exp(ref - lp)),
    ),
}


def hand_loss_and_grad(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], f: PerToken, df: PerToken
) -> tuple[float, torch.Tensor]:
    logits64 = logits.double()
    labels = batch["labels"]
    logp = hand_logprobs(logits64, labels)
    softmax = torch.exp(logits64) / torch.exp(logits64).sum(-1, keepdim=True)
    weights = torch.where(labels != -100, batch["loss_mask"].double(), 0.0)
    total_weight = float(weights.sum())
    value, grad = 0.0, torch.zeros_like(logits64)
    for b in range(B):
        for t in range(T):
            w = float(weights[b, t])
            if w == 0:
                continue
            args = (
                float(logp[b, t]),
                float(batch["sampling_logprobs"][b, t]),
                float(batch["advantages"][b, t]),
                float(batch["reference_logprobs"][b, t]),
            )
            value += w * f(*args) / total_weight
            onehot = torch.zeros(V, dtype=torch.float64)
            onehot[labels[b, t]] = 1.0
            grad[b, t] = w / total_weight * df(*args) * (onehot - softmax[b, t])
    return value, grad


@pytest.mark.parametrize("name", list(CASES))
def test_loss_value_and_gradient_match_hand_computation(name: str) -> None:
    factory, f, df = CASES[name]
    logits, batch = make_rl_batch()
    logits.requires_grad_(True)
    loss = factory()(logits, batch)
    loss.backward()
    expected_value, expected_grad = hand_loss_and_grad(logits.detach(), batch, f, df)
    assert loss.item() == pytest.approx(expected_value, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(logits.grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(logits.grad).all()  # the garbage at ignored positions stayed out
    assert logits.grad[0, 0].abs().max() == 0 and logits.grad[1, 0].abs().max() == 0


def valid_positions(batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    valid = (batch["labels"] != -100) & (batch["loss_mask"] > 0)
    return [(b, t) for b in range(B) for t in range(T) if valid[b, t]]


def test_ppo_zeroes_the_gradient_exactly_where_the_clip_binds() -> None:
    logits, batch = make_rl_batch()
    logits.requires_grad_(True)
    make_ppo_loss()(logits, batch).backward()
    for (b, t), ratio, advantage in zip(valid_positions(batch), RATIOS, ADVANTAGES, strict=True):
        binds = (ratio > 1.2 and advantage > 0) or (ratio < 0.8 and advantage < 0)
        has_grad = bool(logits.grad[b, t].abs().max() > 0)
        assert has_grad != binds, f"token {(b, t)} r={ratio} A={advantage}"
    # The regions the test is about are all present.
    assert sum(r > 1.2 and a > 0 for r, a in zip(RATIOS, ADVANTAGES, strict=True)) >= 1
    assert sum(r > 1.2 and a < 0 for r, a in zip(RATIOS, ADVANTAGES, strict=True)) >= 1
    assert sum(r < 0.8 and a < 0 for r, a in zip(RATIOS, ADVANTAGES, strict=True)) >= 1
    assert sum(r < 0.8 and a > 0 for r, a in zip(RATIOS, ADVANTAGES, strict=True)) >= 1


def test_ppo_thresholds_are_configurable() -> None:
    logits, batch = make_rl_batch()
    # With a wide interval nothing is clipped: PPO becomes the importance-sampling loss.
    wide = make_ppo_loss(clip_low=0.1, clip_high=10.0)(logits, batch)
    plain = make_importance_sampling_loss()(logits, batch)
    assert wide.item() == pytest.approx(plain.item(), rel=1e-6)
    assert make_ppo_loss()(logits, batch).item() != pytest.approx(plain.item(), rel=1e-3)


def test_cispo_caps_the_weight_but_keeps_the_gradient_of_clipped_tokens() -> None:
    logits, batch = make_rl_batch()
    logits.requires_grad_(True)
    make_cispo_loss(clip_low=0.8, clip_high=1.2)(logits, batch).backward()
    assert all(logits.grad[b, t].abs().max() > 0 for b, t in valid_positions(batch))
    # Two tokens of ratio 1.5 and 2.0 (both capped at 1.2) get gradients in the same proportion
    # as their weight * advantage * (onehot - softmax): compare one to its hand value.
    _, expected = hand_loss_and_grad(logits.detach(), batch, *CASES["cispo"][1:])
    b, t = valid_positions(batch)[RATIOS.index(2.0)]
    torch.testing.assert_close(logits.grad[b, t].double(), expected[b, t], rtol=1e-4, atol=1e-7)


def test_registry_and_bad_arguments() -> None:
    assert set(RL_LOSSES) == {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro"}
    assert make_rl_loss("cross_entropy") is cross_entropy_loss
    with pytest.raises(ValueError, match=r"unknown loss 'grpo'.*'cispo'"):
        make_rl_loss("grpo")
    with pytest.raises(ValueError, match=r"loss 'dro'.*clip_low"):
        make_rl_loss("dro", clip_low=0.5)
    with pytest.raises(ValueError, match="clip_low must be in"):
        make_ppo_loss(clip_low=1.5)
    with pytest.raises(ValueError, match="clip_high must be >= 1"):
        make_cispo_loss(clip_high=0.9)
    with pytest.raises(ValueError, match="kl_coef"):
        make_dro_loss(kl_coef=-1.0)
    logits, batch = make_rl_batch()
    del batch["advantages"]
    with pytest.raises(KeyError, match="'advantages'"):
        make_ppo_loss()(logits, batch)
    logits, batch = make_rl_batch()
    del batch["reference_logprobs"]
    with pytest.raises(KeyError, match="'reference_logprobs'"):
        make_ppo_loss(kl_coef=0.1)(logits, batch)


def test_diagnostics_match_hand_values_and_stay_off_the_graph() -> None:
    logits, batch = make_rl_batch()
    logits.requires_grad_(True)
    stats = rl_diagnostics(logits, batch)
    assert all(isinstance(v, float) for v in stats.values())
    assert logits.grad is None and not any(isinstance(v, torch.Tensor) for v in stats.values())
    ratios = sorted(RATIOS)
    assert stats["ratio_p50"] == pytest.approx((ratios[3] + ratios[4]) / 2, rel=1e-5)
    assert stats["ratio_max"] == pytest.approx(2.0, rel=1e-5)
    clipped = sum(r < 0.8 or r > 1.2 for r in RATIOS)
    assert stats["clip_fraction"] == pytest.approx(clipped / len(RATIOS))
    weights = [float(batch["loss_mask"][b, t]) for b, t in valid_positions(batch)]
    k3 = [r - 1 - math.log(r) for r in RATIOS]
    expected_kl = sum(w * k for w, k in zip(weights, k3, strict=True)) / sum(weights)
    assert stats["kl_sampler_trainer"] == pytest.approx(expected_kl, rel=1e-5)
    probs = torch.softmax(logits.detach().double(), -1)
    entropies = [float(-(probs[b, t] * probs[b, t].log()).sum()) for b, t in valid_positions(batch)]
    expected_entropy = sum(w * e for w, e in zip(weights, entropies, strict=True)) / sum(weights)
    assert stats["entropy"] == pytest.approx(expected_entropy, rel=1e-5)


def test_ppo_micro_batches_through_the_backend_equal_the_whole_batch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    batch = make_batch(21, batch_size=4, ignore_prefix=(0, 3, 9, 5))
    generator = torch.Generator().manual_seed(7)
    batch["loss_mask"] = (torch.rand(4, 16, generator=generator) > 0.3).float()
    batch["advantages"] = torch.randn(4, 1, generator=generator).expand(4, 16).contiguous()
    model = load_hf_model(tiny_model_dir, torch.float32, None)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    noise = torch.randn(4, 16, generator=generator) * 0.4  # a sampler that is off-policy
    batch["sampling_logprobs"] = (
        torch.log_softmax(logits, -1)
        .gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1))
        .squeeze(-1)
        + noise
    )
    assert rl_diagnostics(logits, batch)["clip_fraction"] > 0.2  # the clip really is exercised
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]

    def train(batches: list[dict[str, torch.Tensor]], directory: Path) -> tuple[dict, list]:
        model = load_hf_model(tiny_model_dir, torch.float32, None)
        # SGD: the update is linear in the gradient, so equal weights mean equal gradients (Adam's
        # first step is about lr * sign(g), which would hide or blow up tiny differences).
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_fn = make_ppo_loss()
        with PyTorchTrainingBackend(model, optimizer, loss_fn, directory, "cpu") as backend:
            grad_norms = []
            for _ in range(2):
                for micro in batches:
                    backend.forward_backward(micro)
                grad_norms.append(backend.optim_step().wait()["grad_norm"])
            return backend.get_weights().wait(), grad_norms

    (split, split_norms) = train(halves, tmp_path / "split")
    (whole, whole_norms) = train([batch], tmp_path / "whole")
    assert split_norms == pytest.approx(whole_norms, rel=1e-5)
    initial = load_hf_model(tiny_model_dir, torch.float32, None).state_dict()
    assert max((split[k] - whole[k]).abs().max().item() for k in whole) < 1e-6
    assert max((whole[k] - initial[k]).abs().max().item() for k in whole) > 1e-4  # it trained
