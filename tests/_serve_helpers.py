"""`rollouts serve` for the tests: a tiny model over the char vocabulary, and the server in a
child process on a free port."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollouts.data import build_char_tokenizer

API_KEY = "tml-contract-test"


def served_model_dir(path: Path, hidden_size: int = 32, positions: int = 64) -> Path:
    """A tiny Llama and its tokenizer, saved with save_pretrained."""
    tokenizer = build_char_tokenizer(model_max_length=positions)
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=positions,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Server:
    """`rollouts serve` in a child process, on a free port."""

    def __init__(self, model_dir: Path, root: Path, *extra: str) -> None:
        command = [sys.executable, "-m", "rollouts.cli", "serve", "--model", str(model_dir),
                   "--port", "0", "--root", str(root), *extra]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)  # fmt: skip
        line = self.process.stdout.readline()  # the address, printed once bound
        assert "http://" in line, line + self.process.stdout.read()
        self.url = line.split(" at ")[1].split()[0]
        deadline = time.monotonic() + 60
        while True:  # bound: the socket listens once uvicorn runs
            try:
                httpx.get(f"{self.url}/api/v1/healthz", headers={"X-API-Key": API_KEY}, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
