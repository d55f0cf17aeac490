"""Per-layer gradient norms: the backend's figures equal a plain backward's, grouped by hand; they
add up to the global norm; an SFT run logs them every N steps and draws them."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch.nn.functional as F
import trio
from _sft_helpers import ListLogger, addition_data, make_backend, make_model_dir
from conftest import make_batch

from rollouts.monitoring import JSONLLogger, plot_grad_flow
from rollouts.sft import SFTTrainingConfig, run_sft_training
from rollouts.training.backends._queued import layer_of


def test_layer_names() -> None:
    assert layer_of("model.layers.3.mlp.up_proj.weight") == "layers.3"
    assert layer_of("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == (
        "layers.0"
    )
    assert layer_of("model.embed_tokens.weight") == "embed_tokens"
    assert layer_of("lm_head.weight") == "lm_head"
    assert layer_of("model.norm.weight") == "norm"


def test_the_backends_layer_norms_equal_a_plain_backward(tiny_model_dir: Path, tmp_path) -> None:
    from rollouts.training.backends import create_pytorch_backend

    batch = make_batch(3)
    with create_pytorch_backend(tiny_model_dir, tmp_path, device_type="cpu") as backend:
        model = copy.deepcopy(backend.model)
        backend.forward_backward(batch)
        stepped = backend.optim_step(layer_grad_norms=True).wait(60)
    logits = model(input_ids=batch["input_ids"]).logits
    F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten()).backward()
    by_hand: dict[str, float] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")  # "model.layers.N.*" -> "layers.N"; else the module's name
        layer = f"layers.{parts[2]}" if parts[1:2] == ["layers"] else parts[-2]
        by_hand[layer] = by_hand.get(layer, 0.0) + float(param.grad.square().sum())
    norms = stepped["layer_grad_norms"]
    assert set(norms) == set(by_hand)
    for layer, squared in by_hand.items():
        assert norms[layer] == pytest.approx(math.sqrt(squared), rel=1e-5)
    total = math.sqrt(sum(n * n for n in norms.values()))
    assert total == pytest.approx(stepped["grad_norm"], rel=1e-5), "they add up to the global norm"


def test_an_sft_run_logs_layer_norms_every_n_steps_and_draws_them(tmp_path: Path) -> None:
    backend = make_backend(make_model_dir(tmp_path / "model"), tmp_path / "checkpoints")
    config = SFTTrainingConfig(micro_batch_size=8, grad_norms_every_steps=3, progress_bar=False)
    logger = JSONLLogger(tmp_path / "run" / "metrics.jsonl")
    memory = ListLogger()

    class Both:
        def log(self, record: dict) -> None:
            logger.log(record)
            memory.log(record)

        def close(self) -> None:
            logger.close()

    with backend:
        result = trio.run(
            run_sft_training, backend, addition_data("train", 64), config, None, Both()
        )
    logger.close()
    flows = [r for r in memory.records if r.get("kind") == "grad_norms"]
    assert [r["step"] for r in flows] == [s for s in range(1, result.final_step + 1) if s % 3 == 0]
    assert all("layers.0" in r["layers"] and "lm_head" in r["layers"] for r in flows)
    png = plot_grad_flow(tmp_path / "run")
    assert png == tmp_path / "run" / "grad_flow.png" and png.stat().st_size > 0
    assert plot_grad_flow(tmp_path / "run", tmp_path / "other.png") == tmp_path / "other.png"
