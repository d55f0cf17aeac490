"""`export_hf` writes a complete model: weights, config, generation config, and the tokenizer with
its chat template, so `AutoModelForCausalLM`, `AutoTokenizer` and a `transformers` pipeline load
the directory on their own and reproduce the backend's log-probs."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, pipeline

from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.training.backends import create_pytorch_backend
from rollouts.training.losses import label_logprobs


def _model_dir(root: Path) -> Path:
    tokenizer = build_char_tokenizer()
    config = tiny_llama_config(vocab_size=len(tokenizer))
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def test_an_export_loads_with_auto_classes_and_a_pipeline(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path)
    source = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([source.encode("12+34=46")] * 2)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    with create_pytorch_backend(
        model_dir, tmp_path / "ckpt", device_type="cpu", learning_rate=1e-2
    ) as backend:
        for _ in range(2):
            backend.forward_backward(batch)
            backend.optim_step()
        expected = backend.forward(batch).wait(timeout=60)["logprobs"]
        exported = backend.export_hf(tmp_path / "export").wait(timeout=60)
    names = {path.name for path in exported.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names

    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template == source.chat_template
    assert tokenizer.encode("12+34=46") == source.encode("12+34=46")
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(label_logprobs(logits, batch["labels"]), expected)

    generator = pipeline("text-generation", model=str(exported), device="cpu")
    messages = [{"role": "user", "content": "1+2"}]
    out = generator(messages, max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"][-1]["role"] == "assistant"
