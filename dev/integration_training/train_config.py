"""The schema of a training-command config: frozen dataclasses that a config file instantiates.

A config file (`configs/*.py`) is plain Python that builds one `TrainConfig` named `config`;
`train.py` loads it and lets the command line override single fields through tyro
(`--sft.learning_rate 3e-4`, `--target.device_type cuda`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rollouts.training import SFTTrainingConfig

__all__ = ["BACKENDS", "DataConfig", "ModelConfig", "TargetConfig", "TrainConfig"]

BACKENDS = ("pytorch", "fsdp")
TASKS = ("", "addition")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model: a Hugging Face directory or hub id, or a tiny Llama built from the fields."""

    name: str = ""  # HF model dir or hub id; "" builds a tiny Llama from the fields below
    tokenizer: str = ""  # tokenizer dir or hub id; "" uses `name`'s, or the char tokenizer
    dtype: str = "float32"  # parameter dtype: "float32", "bfloat16" or "float16"
    hidden_size: int = 128  # tiny Llama only, like the rest of this block
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 64
    init_seed: int = 0  # seeds the tiny model's random initialisation

    def __post_init__(self) -> None:
        sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for name in (*sizes, "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)}; must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be a multiple of "
                f"model.num_attention_heads={self.num_attention_heads}"
            )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the chat data lives and how it is cut."""

    train_path: str = ""  # JSONL/parquet file, dataset dir or hub name
    val_path: str = ""  # validation data ("" = none: no eval, no early stopping)
    max_length: int = 64  # tokens per example, template included
    overlong: str = "truncate"  # "truncate" or "drop" examples longer than max_length
    skip_bad_lines: bool = False  # skip (and count) malformed records instead of failing
    task: str = ""  # "addition": also report greedy task accuracy before and after training
    accuracy_examples: int = 300  # validation examples used for the accuracy figure

    def __post_init__(self) -> None:
        if not self.train_path:
            raise ValueError("data.train_path is empty; it must name the training data")
        if self.task not in TASKS:
            raise ValueError(f"data.task={self.task!r}; must be one of {TASKS}")
        if self.accuracy_examples < 1:
            raise ValueError(f"data.accuracy_examples={self.accuracy_examples}; must be >= 1")


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """Where training runs."""

    device_type: str = "cpu"  # "cpu", "cuda" or "mps"
    gpu_ranks: tuple[int, ...] = (0,)  # CUDA devices; the single-device backend uses the first
    backend: str = "pytorch"  # "pytorch" (one device) or "fsdp" (sharded across gpu_ranks)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"target.backend={self.backend!r}; must be one of {BACKENDS}")
        if not self.gpu_ranks or any(rank < 0 for rank in self.gpu_ranks):
            raise ValueError(f"target.gpu_ranks={self.gpu_ranks}; non-empty, each >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One run of `train.py`: model, data, SFT settings, target device, output directory.

    An `rl` section (the RL stage's config) is added beside `sft` by configs that run RL.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig
    sft: SFTTrainingConfig = field(default_factory=SFTTrainingConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    output_dir: str = "runs/default"  # metrics.jsonl, checkpoints/, metrics.png go here
    overwrite: bool = False  # a fresh run may clear an output_dir left by an earlier run
