"""The schema of a training-command config: frozen dataclasses that a config file instantiates.

A config file (`configs/*.py`) is plain Python that builds one `TrainConfig` named `config`;
`train.py` loads it and lets the command line override single fields through tyro
(`--sft.learning_rate 3e-4`, `--target.device_type cuda`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from rollouts.data import MASK_MODES
from rollouts.rl import RLTrainingConfig
from rollouts.sft import SFTTrainingConfig
from rollouts.training.losses import RL_LOSSES

__all__ = [
    "BACKENDS",
    "DataConfig",
    "LoRAConfig",
    "ModelConfig",
    "RLStageConfig",
    "TargetConfig",
    "TrainConfig",
    "with_fields",
]

BACKENDS = ("pytorch", "fsdp")
DTYPES = ("float32", "bfloat16", "float16")
DEVICE_TYPES = ("cpu", "cuda", "mps")
ENGINE_MODES = ("process", "thread")
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
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; must be one of {DTYPES}")
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
    mask_mode: str = "auto"  # assistant masks: "auto", "generation_tags" or "incremental"
    enable_thinking: bool | None = None  # passed to the chat template when set (Qwen3-style)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"data.task={self.task!r}; must be one of {TASKS}")
        if self.accuracy_examples < 1:
            raise ValueError(f"data.accuracy_examples={self.accuracy_examples}; must be >= 1")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"data.mask_mode={self.mask_mode!r}; must be one of {MASK_MODES}")


LORA_STAGES = ("sft", "rl")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """LoRA adapters (peft) instead of full fine-tuning; `docs/lora.md`."""

    rank: int = 0  # > 0: train adapters of this rank; 0: the whole model
    alpha: float = 16.0  # the adapters' scale is alpha / rank
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # (): every attention and MLP linear layer
    lm_head: bool = False  # adapt the LM head too
    embeddings: bool = False  # adapt the input embedding too
    stages: tuple[str, ...] = LORA_STAGES  # the stages that train adapters (each exports merged)

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank}; must be >= 0 (0: no LoRA)")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha}; must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout}; must lie in [0, 1)")
        unknown = sorted(set(self.stages) - set(LORA_STAGES))
        if unknown:
            raise ValueError(f"lora.stages has {unknown}; each must be one of {LORA_STAGES}")

    def options(self, stage: str) -> dict[str, object]:
        """The factories' LoRA keyword arguments for `stage` (none when it trains everything)."""
        if not self.rank or stage not in self.stages:
            return {}
        return {
            "lora_rank": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "lora_target_modules": self.target_modules,
            "lora_lm_head": self.lm_head,
            "lora_embeddings": self.embeddings,
        }


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """Where training runs."""

    device_type: str = "cpu"  # "cpu", "cuda" or "mps"
    gpu_ranks: tuple[int, ...] = (0,)  # the single-device backend's CUDA device (the first);
    # under fsdp each rank takes cuda:LOCAL_RANK from torchrun instead
    backend: str = "pytorch"  # "pytorch" (one device) or "fsdp" (sharded over torchrun's ranks)
    mixed_precision: str = ""  # compute dtype, e.g. "bfloat16"; "" = model.dtype
    # The SFT trainer's intra-op threads on CPU: "auto" (timed when it starts: 1 on a box other
    # processes keep busy), "torch" (torch's default: every core) or a count such as "2".
    threads: str = "auto"

    def num_threads(self) -> int | str | None:
        """`threads` as the factories' `num_threads` option."""
        if self.threads == "torch":
            return None
        return self.threads if self.threads == "auto" else int(self.threads)

    def __post_init__(self) -> None:
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(
                f"target.device_type={self.device_type!r}; must be one of {DEVICE_TYPES}"
            )
        if self.mixed_precision not in ("", *DTYPES):
            raise ValueError(
                f"target.mixed_precision={self.mixed_precision!r}; must be '' or one of {DTYPES}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"target.backend={self.backend!r}; must be one of {BACKENDS}")
        if self.threads not in ("auto", "torch") and not (
            self.threads.isdigit() and int(self.threads) >= 1
        ):
            raise ValueError(
                f"target.threads={self.threads!r}; must be 'auto', 'torch' or a count >= 1"
            )
        if not self.gpu_ranks or any(rank < 0 for rank in self.gpu_ranks):
            raise ValueError(f"target.gpu_ranks={self.gpu_ranks}; non-empty, each >= 0")


@dataclass(frozen=True, kw_only=True)
class RLStageConfig:
    """The RL stage, run after SFT from its final model, on `data.task` with a rollout engine."""

    enabled: bool = False  # run RL after SFT (or alone, with skip_sft)
    # Your reward, "module:function" or "file.py:function": f(prompt, completion) -> float,
    # scoring completions of the prompts in prompts_path.
    reward: str = ""
    # Or your task, "module:Class" (a rollouts.tasks.Task, built with no arguments).
    task: str = ""
    prompts_path: str = ""  # rl.reward's training prompts ("" = data.train_path)
    loss: str = "ppo"  # a name in rollouts.training.losses.RL_LOSSES
    kl_coef: float = 0.0  # > 0: a k3 KL penalty toward the reference policy, in the loss
    reference: str = ""  # the reference model ("" = the SFT model this stage starts from)
    learning_rate: float = 1e-4  # constant (RL steps are few; no schedule)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    test_path: str = ""  # held-out questions for the SFT-vs-RL comparison ("" = data.val_path)
    test_examples: int = 300  # held-out questions compared, at most
    engine_mode: str = "process"  # rollout engine in a child process, or a thread of this one
    engine_threads: int = 1  # the engine's intra-op threads
    trainer_threads: int = 0  # the trainer worker's intra-op threads; 0: the cores the engine
    # leaves (cores - engine_threads, at least 1), so the two never oversubscribe the machine
    training: RLTrainingConfig = field(default_factory=RLTrainingConfig)

    def __post_init__(self) -> None:
        if self.loss not in RL_LOSSES:
            raise ValueError(f"rl.loss={self.loss!r}; must be one of {sorted(RL_LOSSES)}")
        if self.engine_mode not in ENGINE_MODES:
            raise ValueError(f"rl.engine_mode={self.engine_mode!r}; must be one of {ENGINE_MODES}")
        if not self.learning_rate > 0:
            raise ValueError(f"rl.learning_rate={self.learning_rate}; must be > 0")
        if not self.kl_coef >= 0:
            raise ValueError(f"rl.kl_coef={self.kl_coef}; must be >= 0")
        for name in ("test_examples", "engine_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name}={getattr(self, name)}; must be >= 1")
        if self.trainer_threads < 0:
            raise ValueError(f"rl.trainer_threads={self.trainer_threads}; must be >= 0")
        if self.reward and self.task:
            raise ValueError(
                f"rl.reward={self.reward!r} and rl.task={self.task!r}; set one (a task has its "
                "own reward)"
            )
        if self.prompts_path and not self.reward:
            raise ValueError("rl.prompts_path is read only with rl.reward; set rl.reward too")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One run of `train.py`: model, data, SFT (and optionally RL) settings, target device,
    output directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig
    sft: SFTTrainingConfig = field(default_factory=SFTTrainingConfig)
    rl: RLStageConfig = field(default_factory=RLStageConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    output_dir: str = "runs/default"  # metrics.jsonl, checkpoints/, metrics.png go here
    overwrite: bool = False  # a fresh run may clear an output_dir left by an earlier run
    skip_sft: bool = False  # RL only, from model.name (needs rl.enabled)

    def __post_init__(self) -> None:
        rl, data = self.rl, self.data
        if self.skip_sft and not rl.enabled:
            raise ValueError("skip_sft leaves nothing to run; set rl.enabled too")
        needs_train_path = not self.skip_sft or (rl.enabled and not rl.task and not rl.prompts_path)
        if needs_train_path and not data.train_path:
            raise ValueError("data.train_path is empty; it must name the training data")
        if not rl.enabled:
            return
        if not (rl.reward or rl.task or data.task == "addition"):
            raise ValueError(
                "rl.enabled needs a reward: set rl.reward='module:function', "
                "rl.task='module:Class', or data.task='addition'"
            )
        if not rl.task and not data.val_path:
            raise ValueError(
                "rl.enabled needs held-out prompts for its accuracy before and after: set "
                "data.val_path (or use rl.task, whose eval_prompts() are used)"
            )


def with_fields(config: Any, values: dict[str, Any], source: str = "override") -> Any:
    """`config` with fields replaced by dotted name (`{"sft.learning_rate": 3e-4}`), each section
    re-validated. An unknown name, or a value of another type than the field's, is a ValueError
    naming it and `source` (a search space, say)."""
    for name, value in values.items():
        config = _with_field(config, name.split("."), value, name, source)
    return config


def _with_field(section: Any, path: list[str], value: Any, name: str, source: str) -> Any:
    head, rest = path[0], path[1:]
    names = [f.name for f in fields(section)] if is_dataclass(section) else []
    if head not in names:
        raise ValueError(
            f"{source}: {name!r} names no config field ({head!r} is not one of {names})"
        )
    current = getattr(section, head)
    if rest:
        return replace(section, **{head: _with_field(current, rest, value, name, source)})
    if is_dataclass(current):
        raise ValueError(f"{source}: {name!r} is a section; name one of its fields")
    expected = type(current)
    fits = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    fits = fits or (expected is float and isinstance(value, int) and not isinstance(value, bool))
    if current is not None and not fits:
        raise ValueError(
            f"{source}: {name}={value!r} ({type(value).__name__}); the field holds "
            f"{expected.__name__} values, like its current {current!r}"
        )
    return replace(section, **{head: float(value) if expected is float else value})
