"""Per-call settings of the protocol: a loss for one `forward_backward` or `forward`, label
log-probs on request, and one step's AdamW settings (`AdamSettings`), checked against a plain
PyTorch loop with torch's own AdamW."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch

from rollouts.training.backends import AdamSettings, create_pytorch_backend
from rollouts.training.losses import label_logprobs, make_importance_sampling_loss


def test_a_call_loss_and_step_settings_equal_a_plain_loop(tiny_model_dir, tmp_path) -> None:
    settings = AdamSettings(learning_rate=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1,
                            max_grad_norm=0.5)  # fmt: skip
    batch = make_batch(0)
    sampling = torch.full(batch["labels"].shape, -4.0)
    advantages = torch.linspace(-1, 1, batch["labels"].numel()).reshape(batch["labels"].shape)
    rl_batch = {**batch, "sampling_logprobs": sampling, "advantages": advantages}
    with create_pytorch_backend(tiny_model_dir, tmp_path / "b", device_type="cpu",
                                normalization="sum", learning_rate=1e-3) as backend:  # fmt: skip
        reference = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
        ce = backend.forward_backward(batch, return_logprobs=True).wait(60)
        rl = backend.forward_backward(rl_batch, loss_fn=make_importance_sampling_loss()).wait(60)
        step = backend.optim_step(adam=settings).wait(60)
        trained = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
        group = backend.optimizer.param_groups[0]
        assert group["betas"] == (0.9, 0.95) and group["weight_decay"] == 0.0, "settings restored"
        backend.forward_backward(make_batch(1))
        assert step["lr"] == 0.02 and backend.optim_step().wait(60)["lr"] == 1e-3
        with pytest.raises(ValueError, match="not both"):
            backend.optim_step(adam=settings, learning_rate=1e-3)

    model = backend.model.__class__(backend.model.config)
    model.load_state_dict(reference)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, betas=(0.8, 0.9), eps=1e-6,
                                  weight_decay=0.1)  # fmt: skip
    logits = model(input_ids=batch["input_ids"]).logits
    logp = label_logprobs(logits, batch["labels"])
    valid = batch["labels"] != -100
    ce_sum = -(logp * valid).sum()
    rl_sum = -(torch.exp(logp - sampling) * advantages * valid).sum()  # summed, not averaged
    (ce_sum + rl_sum).backward()
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.5)
    optimizer.step()
    assert step["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    assert ce["loss"] * ce["token_weight"] == pytest.approx(float(ce_sum), rel=1e-5)
    torch.testing.assert_close(ce["logprobs"], logp.detach())
    for name, param in model.named_parameters():
        # Adam divides by sqrt(v) + eps: two backward passes against one move a weight by ~1e-6.
        torch.testing.assert_close(trained[name], param.detach(), rtol=1e-4, atol=1e-5)
    assert rl["loss"] * rl["token_weight"] == pytest.approx(float(rl_sum), rel=1e-4)


def test_adam_settings_refuse_bad_values() -> None:
    for bad in ({"learning_rate": 0.0}, {"learning_rate": 1e-3, "betas": (0.9, 1.0)},
                {"learning_rate": 1e-3, "max_grad_norm": 0.0},
                {"learning_rate": 1e-3, "weight_decay": -1},
                {"learning_rate": float("nan")}, {"learning_rate": 1e-3, "eps": float("inf")},
                {"learning_rate": 1e-3, "max_grad_norm": float("inf")}):  # fmt: skip
        with pytest.raises(ValueError, match="AdamSettings"):
            AdamSettings(**bad)
