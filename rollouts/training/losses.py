"""Loss functions with the backend signature `loss_fn(logits, batch) -> scalar`.

The convention every loss here follows, and every backend relies on:

- `batch["labels"]` [B, T] are the targets aligned with `logits` [B, T, V]; `labels == -100` is
  ignored. An optional `batch["loss_mask"]` [B, T] holds per-token weights (0 = ignored).
- The scalar returned is the weighted *mean* over the batch's tokens:
  sum(w * per_token_loss) / sum(w), with w = `token_weights(batch)`.
- An optional `batch["temperature"]` (a positive float; an RL batch carries its sampling
  temperature) means the policy is softmax(logits / T): the backend divides the logits by it
  (`apply_temperature`) before calling the loss and before any log-prob it returns, so the
  trainer's log-probs are those of the distribution the sampler drew from.

Because `token_weights` is shared, a backend can turn the mean back into the weighted sum
(mean * sum(w)) and normalise by the whole optimizer step's weight, which is what makes gradient
accumulation and data parallelism exact.

The RL losses (`make_ppo_loss`, `make_cispo_loss`, ..., picked by name with `make_rl_loss`) follow
the same convention; `rl_diagnostics` computes their per-token statistics for logging, outside the
gradient path. The formulas are in `docs/rl.md` and in each factory's docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]

__all__ = [
    "IGNORE_INDEX",
    "RL_LOSSES",
    "Batch",
    "LossFn",
    "apply_temperature",
    "cross_entropy_loss",
    "is_token_local",
    "kl_penalty_k3",
    "label_logprobs",
    "make_cispo_loss",
    "make_cross_entropy_loss",
    "make_dro_loss",
    "make_importance_sampling_loss",
    "make_ppo_loss",
    "make_rl_loss",
    "ratio_diagnostics",
    "rl_diagnostics",
    "tinker_spec",
    "token_weights",
    "weighted_mean",
]


def apply_temperature(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`logits / batch["temperature"]`, or the logits themselves without one (or at 1.0)."""
    temperature = batch.get("temperature")
    if temperature is None:
        return logits
    value = float(temperature)
    return logits if value == 1.0 else logits / value


def token_weights(batch: Batch) -> torch.Tensor:
    """Per-token weights [B, T], float32: `loss_mask` (default 1) where labels != -100, else 0."""
    labels = batch["labels"]
    weights = (labels != IGNORE_INDEX).to(torch.float32)
    loss_mask = batch.get("loss_mask")
    if loss_mask is not None:
        if loss_mask.shape != labels.shape:
            raise ValueError(
                f"loss_mask has shape {tuple(loss_mask.shape)}, expected the labels' shape "
                f"{tuple(labels.shape)}"
            )
        weights = weights * loss_mask.to(torch.float32)
    return weights


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability [B, T] (float32) of each label under `logits` [B, T, V]; 0 where ignored."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits have shape {tuple(logits.shape)} but labels {tuple(labels.shape)}; labels "
            "must be aligned with the logits (labels[b, t] is the target of logits[b, t])"
        )
    safe_labels = labels.clamp(min=0)  # -100 would index out of range; those positions get 0
    logprobs_BT = -F.cross_entropy(
        logits.float().flatten(0, 1), safe_labels.flatten(), reduction="none"
    ).view(labels.shape)
    return logprobs_BT.masked_fill(labels == IGNORE_INDEX, 0.0)


def weighted_mean(per_token_BT: torch.Tensor, weights_BT: torch.Tensor) -> torch.Tensor:
    """sum(w * x) / sum(w); exactly 0 (still differentiable) when every weight is 0."""
    total_weight = weights_BT.sum()
    weighted_sum = (per_token_BT * weights_BT).sum()
    return weighted_sum / total_weight.clamp(min=torch.finfo(torch.float32).tiny)


def cross_entropy_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Token-weighted mean negative log-likelihood of `batch["labels"]`."""
    labels = batch["labels"]
    if batch.get("loss_mask") is None:
        # Unweighted: summing inside cross_entropy and dividing by the count rounds exactly like
        # F.cross_entropy(reduction="mean"), so a plain training loop is matched bit for bit.
        nll_sum = F.cross_entropy(
            logits.float().flatten(0, 1),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return nll_sum / (labels != IGNORE_INDEX).sum().clamp(min=1)
    return weighted_mean(-label_logprobs(logits, labels), token_weights(batch))


# -- RL losses ------------------------------------------------------------------------------------
#
# Every RL batch carries, besides `labels` and `loss_mask` (1 on completion tokens):
#   advantages [B, T]         per-token advantage A (float; constant over a completion for GRPO)
#   sampling_logprobs [B, T]  log q(label) under the distribution the sampler actually drew from
#   reference_logprobs [B, T] log p_ref(label), only when a KL penalty is asked for
# With logp = log p_theta(label) from the logits and r = exp(logp - sampling_logp), the per-token
# losses are the ones in `docs/rl.md`; each factory returns the token-weighted mean of its per-token
# loss (the convention above), so micro-batch and rank splitting stay invisible. Every factory takes
# `kl_coef`: above 0 it adds kl_coef * k3 per token, a KL penalty toward the reference policy
# (`kl_penalty_k3`), and then the batch must carry `reference_logprobs`.

PPO_CLIP_LOW_DEFAULT, PPO_CLIP_HIGH_DEFAULT = 0.8, 1.2
# CISPO (MiniMax-M1): no lower bound on the IS weight, only an upper one at 1 + 0.28.
CISPO_CLIP_LOW_DEFAULT, CISPO_CLIP_HIGH_DEFAULT = 0.0, 1.28
DRO_BETA_DEFAULT = 0.05
# exp() of a log-ratio above this overflows float32; such ratios are clamped (the gradient of
# a clamped ratio is 0, which is what every clipped objective does with it anyway).
_LOG_RATIO_MAX = 20.0


def _require(batch: Batch, key: str, loss_name: str, like: torch.Tensor) -> torch.Tensor:
    value = batch.get(key)
    if value is None:
        hint = (
            " (run_rl_training(reference=...) computes them; a loss with kl_coef > 0 needs it)"
            if key == "reference_logprobs"
            else ""
        )
        raise KeyError(f"the {loss_name} loss needs batch[{key!r}]; got keys {sorted(batch)}{hint}")
    if value.shape != like.shape:
        raise ValueError(
            f"batch[{key!r}] has shape {tuple(value.shape)}, expected the labels' shape "
            f"{tuple(like.shape)}"
        )
    return value.to(torch.float32)


def _check_kl_coef(kl_coef: float) -> None:
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")


def _check_clip(clip_low: float, clip_high: float) -> None:
    if not 0 <= clip_low <= 1:
        raise ValueError(f"clip_low must be in [0, 1], got {clip_low}")
    if not clip_high >= 1:
        raise ValueError(f"clip_high must be >= 1, got {clip_high}")


def kl_penalty_k3(logprobs_BT: torch.Tensor, reference_logprobs_BT: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(p_theta || p_ref) on tokens drawn from (about) p_theta.

    k3 = exp(ref - logp) - (ref - logp) - 1: non-negative, unbiased on-policy, lower variance than
    logp - ref (Schulman's "Approximating KL divergence"). Its gradient wrt logp is
    1 - exp(ref - logp), which pulls logp toward ref from either side.
    """
    log_ref_ratio = (reference_logprobs_BT - logprobs_BT).clamp(max=_LOG_RATIO_MAX)
    return torch.exp(log_ref_ratio) - log_ref_ratio - 1.0


def _policy_terms(
    logits: torch.Tensor, batch: Batch, loss_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights, logp, log_ratio, advantages) [B, T]; log_ratio is 0 where the weight is 0."""
    labels = batch["labels"]
    weights_BT = token_weights(batch)
    logprobs_BT = label_logprobs(logits, labels)
    sampling_BT = _require(batch, "sampling_logprobs", loss_name, labels)
    advantages_BT = _require(batch, "advantages", loss_name, labels)
    # Ignored positions may hold anything (padding); keep their ratio at exactly 1 so that exp()
    # never turns garbage into inf * 0 = nan.
    log_ratio_BT = torch.where(weights_BT > 0, logprobs_BT - sampling_BT, 0.0)
    return weights_BT, logprobs_BT, log_ratio_BT, advantages_BT


def _finish(
    per_token_BT: torch.Tensor,
    weights_BT: torch.Tensor,
    logprobs_BT: torch.Tensor,
    batch: Batch,
    kl_coef: float,
    loss_name: str,
) -> torch.Tensor:
    if kl_coef > 0:
        reference_BT = _require(batch, "reference_logprobs", loss_name, batch["labels"])
        reference_BT = torch.where(weights_BT > 0, reference_BT, logprobs_BT.detach())
        per_token_BT = per_token_BT + kl_coef * kl_penalty_k3(logprobs_BT, reference_BT)
    return weighted_mean(per_token_BT, weights_BT)


def tinker_spec(loss_fn: LossFn) -> tuple[str, dict[str, float]] | None:
    """The Tinker API's name and config for `loss_fn`, when one of its losses computes the same
    sum over tokens (cross-entropy, importance sampling, PPO and CISPO without a KL term)."""
    return getattr(loss_fn, "tinker_spec", None)


def is_token_local(loss_fn: LossFn) -> bool:
    """Whether `loss_fn` is a weighted mean over tokens of a per-token value that depends only on
    that token's logits and batch entries. Every loss here is; a backend then computes the LM
    head and the loss only at weighted positions, a chunk at a time
    (`rollouts.training.lm_head`). A custom loss opts in with `loss_fn.token_local = True`; it
    then sees the kept positions as one row [1, N], with every [B, T] entry of the batch gathered
    alike (entries of other shapes, such as [B, T, K], arrive whole: such a loss should not opt
    in)."""
    return bool(getattr(loss_fn, "token_local", False))


def _token_local(loss_fn: LossFn) -> LossFn:
    loss_fn.token_local = True  # type: ignore[attr-defined]
    return loss_fn


def _named(loss_fn: LossFn, name: str, **config: float) -> LossFn:
    loss_fn.tinker_spec = (name, config)  # type: ignore[attr-defined]
    return loss_fn


cross_entropy_loss.tinker_spec = ("cross_entropy", {})  # type: ignore[attr-defined]
_token_local(cross_entropy_loss)


def make_cross_entropy_loss(kl_coef: float = 0.0) -> LossFn:
    """Token-weighted negative log-likelihood (SFT), optionally with the k3 KL penalty."""
    _check_kl_coef(kl_coef)
    if kl_coef == 0:
        return cross_entropy_loss

    def loss_fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        weights_BT = token_weights(batch)
        logprobs_BT = label_logprobs(logits, batch["labels"])
        return _finish(-logprobs_BT, weights_BT, logprobs_BT, batch, kl_coef, "cross_entropy")

    return _token_local(loss_fn)


def make_importance_sampling_loss(kl_coef: float = 0.0) -> LossFn:
    """REINFORCE corrected for the sampler: per token -r * A, r = exp(logp - sampling_logp)."""
    _check_kl_coef(kl_coef)

    def loss_fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        weights_BT, logp_BT, log_ratio_BT, adv_BT = _policy_terms(logits, batch, "importance")
        ratio_BT = torch.exp(log_ratio_BT.clamp(max=_LOG_RATIO_MAX))
        return _finish(-ratio_BT * adv_BT, weights_BT, logp_BT, batch, kl_coef, "importance")

    _token_local(loss_fn)
    return _named(loss_fn, "importance_sampling") if kl_coef == 0 else loss_fn


def make_ppo_loss(
    clip_low: float = PPO_CLIP_LOW_DEFAULT,
    clip_high: float = PPO_CLIP_HIGH_DEFAULT,
    kl_coef: float = 0.0,
) -> LossFn:
    """PPO's clipped surrogate: per token -min(r * A, clip(r, clip_low, clip_high) * A)."""
    _check_clip(clip_low, clip_high)
    _check_kl_coef(kl_coef)

    def loss_fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        weights_BT, logp_BT, log_ratio_BT, adv_BT = _policy_terms(logits, batch, "ppo")
        ratio_BT = torch.exp(log_ratio_BT.clamp(max=_LOG_RATIO_MAX))
        unclipped_BT = ratio_BT * adv_BT
        clipped_BT = ratio_BT.clamp(clip_low, clip_high) * adv_BT
        per_token_BT = -torch.minimum(unclipped_BT, clipped_BT)
        return _finish(per_token_BT, weights_BT, logp_BT, batch, kl_coef, "ppo")

    _token_local(loss_fn)
    if kl_coef > 0:
        return loss_fn
    return _named(loss_fn, "ppo", clip_low_threshold=clip_low, clip_high_threshold=clip_high)


def make_cispo_loss(
    clip_low: float = CISPO_CLIP_LOW_DEFAULT,
    clip_high: float = CISPO_CLIP_HIGH_DEFAULT,
    kl_coef: float = 0.0,
) -> LossFn:
    """CISPO: per token -sg(clip(r, clip_low, clip_high)) * logp * A.

    Unlike PPO, a clipped token still gets a gradient (its weight is capped, not zeroed).
    """
    _check_clip(clip_low, clip_high)
    _check_kl_coef(kl_coef)

    def loss_fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        weights_BT, logp_BT, log_ratio_BT, adv_BT = _policy_terms(logits, batch, "cispo")
        ratio_BT = torch.exp(log_ratio_BT.detach().clamp(max=_LOG_RATIO_MAX))
        per_token_BT = -ratio_BT.clamp(clip_low, clip_high) * logp_BT * adv_BT
        return _finish(per_token_BT, weights_BT, logp_BT, batch, kl_coef, "cispo")

    _token_local(loss_fn)
    if kl_coef > 0:
        return loss_fn
    return _named(loss_fn, "cispo", clip_low_threshold=clip_low, clip_high_threshold=clip_high)


def make_dro_loss(beta: float = DRO_BETA_DEFAULT, kl_coef: float = 0.0) -> LossFn:
    """DRO: per token -(logp * A - beta / 2 * (logp - sampling_logp)^2).

    The quadratic term keeps the policy near the sampler without a ratio, so it is stable far
    off-policy.
    """
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    _check_kl_coef(kl_coef)

    def loss_fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        weights_BT, logp_BT, log_ratio_BT, adv_BT = _policy_terms(logits, batch, "dro")
        per_token_BT = -(logp_BT * adv_BT - 0.5 * beta * log_ratio_BT.square())
        return _finish(per_token_BT, weights_BT, logp_BT, batch, kl_coef, "dro")

    return _token_local(loss_fn)


RL_LOSSES: dict[str, Callable[..., LossFn]] = {
    "cross_entropy": make_cross_entropy_loss,
    "importance_sampling": make_importance_sampling_loss,
    "ppo": make_ppo_loss,
    "cispo": make_cispo_loss,
    "dro": make_dro_loss,
}


def make_rl_loss(name: str, **kwargs: float) -> LossFn:
    """The loss named `name` (a key of `RL_LOSSES`) built with the factory's keyword arguments."""
    factory = RL_LOSSES.get(name)
    if factory is None:
        raise ValueError(f"unknown loss {name!r}; must be one of {sorted(RL_LOSSES)}")
    try:
        return factory(**kwargs)
    except TypeError as error:  # an argument that this factory does not take
        raise ValueError(f"loss {name!r}: {error}") from None


# -- diagnostics, outside the gradient path --------------------------------------------------------

RATIO_QUANTILES = (0.05, 0.5, 0.95)


@torch.no_grad()
def ratio_diagnostics(
    logprobs_BT: torch.Tensor,
    sampling_logprobs_BT: torch.Tensor,
    weights_BT: torch.Tensor,
    clip_low: float = PPO_CLIP_LOW_DEFAULT,
    clip_high: float = PPO_CLIP_HIGH_DEFAULT,
) -> dict[str, float]:
    """How far the trainer (logp) is from the sampler (q) on the tokens with weight > 0.

    - `ratio_p05`, `ratio_p50`, `ratio_p95`, `ratio_max`: quantiles of r = p_theta / q.
    - `clip_fraction`: share of tokens whose r lies outside [clip_low, clip_high].
    - `kl_sampler_trainer`: k3 estimate of KL(q || p_theta) on the sampled tokens,
      mean of (r - 1) - log r; 0 when trainer and sampler agree.
    - `kl_sampler_trainer_k1`: mean of log q - log p_theta (unbiased, can be negative).
    Weighted means use `weights_BT`; quantiles count each valid token once. All NaN when no token
    has weight.
    """
    valid_BT = weights_BT > 0
    names = ["ratio_p05", "ratio_p50", "ratio_p95", "ratio_max", "clip_fraction"]
    if not bool(valid_BT.any()):
        return dict.fromkeys([*names, "kl_sampler_trainer", "kl_sampler_trainer_k1"], float("nan"))
    log_ratio_BT = torch.where(valid_BT, logprobs_BT.float() - sampling_logprobs_BT.float(), 0.0)
    log_ratio_BT = log_ratio_BT.clamp(max=_LOG_RATIO_MAX)
    ratio_BT = torch.exp(log_ratio_BT)
    ratios = ratio_BT[valid_BT]
    quantiles = torch.quantile(ratios, torch.tensor(RATIO_QUANTILES, dtype=ratios.dtype))
    clipped_BT = ((ratio_BT < clip_low) | (ratio_BT > clip_high)).float()
    values = [*quantiles.tolist(), ratios.max(), clipped_BT[valid_BT].mean()]
    stats = {name: float(value) for name, value in zip(names, values, strict=True)}
    stats["kl_sampler_trainer"] = float(weighted_mean(ratio_BT - 1 - log_ratio_BT, weights_BT))
    stats["kl_sampler_trainer_k1"] = float(weighted_mean(-log_ratio_BT, weights_BT))
    return stats


@torch.no_grad()
def rl_diagnostics(
    logits: torch.Tensor,
    batch: Batch,
    clip_low: float = PPO_CLIP_LOW_DEFAULT,
    clip_high: float = PPO_CLIP_HIGH_DEFAULT,
) -> dict[str, float]:
    """`ratio_diagnostics` of an RL batch from its logits, plus `entropy`: the weighted mean
    entropy (nats) of the trainer's full next-token distribution. Plain floats, no gradient."""
    labels = batch["labels"]
    weights_BT = token_weights(batch)
    logits = apply_temperature(logits.detach(), batch)
    logprobs_BTV = torch.log_softmax(logits.float(), dim=-1)
    logp_BT = logprobs_BTV.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sampling_BT = _require(batch, "sampling_logprobs", "diagnostics", labels)
    stats = ratio_diagnostics(logp_BT, sampling_BT, weights_BT, clip_low, clip_high)
    entropy_BT = -(logprobs_BTV.exp() * logprobs_BTV).nan_to_num().sum(-1)
    has_weight = bool((weights_BT > 0).any())
    stats["entropy"] = float(weighted_mean(entropy_BT, weights_BT)) if has_weight else float("nan")
    return stats
