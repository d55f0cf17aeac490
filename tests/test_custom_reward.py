"""RL with the user's own reward or task, named in a config: prompt files, name resolution, the
checks made when a run starts, and `rollouts train` end to end with a reward module in the
current directory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rollouts.data import SFTDataError, read_chat_prompts
from rollouts.tasks.custom import (
    RewardFunctionTask,
    load_object,
    load_reward_function,
    load_task,
    probe_reward,
    prompts_from_file,
)
from rollouts.tasks.protocol import TaskPrompt


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompts_are_cut_before_the_final_reply_and_keep_the_record_fields(tmp_path) -> None:
    user = {"role": "user", "content": "2+2"}
    path = _write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"messages": [{"role": "system", "content": "be brief"}, user,
                          {"role": "assistant", "content": "4"}], "level": 3},
            {"messages": [user]},
            {"prompt": "1+1", "answer": "2", "tests": ["a", "b"]},
            {"prompt": "5+5"},
        ],
    )  # fmt: skip
    prompts = read_chat_prompts(path)
    assert [p.answer for p in prompts] == ["4", None, "2", None]
    assert prompts[0].messages == ({"role": "system", "content": "be brief"}, user)
    assert prompts[0].extra == {"level": 3} and prompts[2].extra == {"tests": ["a", "b"]}
    assert prompts[2].messages == ({"role": "user", "content": "1+1"},)
    assert [p.where for p in prompts][-1] == f"{path} line 4"
    assert len(read_chat_prompts(path, limit=2)) == 2
    task_prompts = prompts_from_file(str(path))
    assert task_prompts[2].metadata == {"tests": ["a", "b"]} and task_prompts[2].answer == "2"


def test_a_bad_prompt_record_names_its_line(tmp_path) -> None:
    path = _write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "1+1"}, {"messages": [{"role": "assistant", "content": "hi"}]}],
    )
    with pytest.raises(SFTDataError, match=r"p.jsonl line 2: the messages before the final"):
        read_chat_prompts(path)
    (tmp_path / "q.jsonl").write_text('{"question": "1+1"}\n')
    with pytest.raises(SFTDataError, match=r"q.jsonl line 1: expected .*got keys \['question'\]"):
        read_chat_prompts(tmp_path / "q.jsonl")


REWARDS = """
def exact(prompt, completion):
    return float(completion.strip() == prompt.answer)

def one_argument(completion):
    return 1.0

def needs_tests(prompt, completion):
    return float(len(prompt.metadata["tests"]) > 0)

def says_yes(prompt, completion):
    return "yes"

class Fixed:
    def train_prompts(self):
        return [TaskPrompt(messages=({"role": "user", "content": "hi"},), answer="x")]
    def eval_prompts(self):
        return self.train_prompts()
    def reward(self, prompt, completion):
        return 0.5

class NoReward:
    def train_prompts(self):
        return []
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text("from rollouts.tasks.protocol import TaskPrompt\n" + REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    return path


def test_names_resolve_from_a_module_or_a_file_and_mistakes_are_named(user_module) -> None:
    prompt = TaskPrompt(messages=({"role": "user", "content": "1+1"},), answer="2")
    by_module = load_reward_function("my_rewards:exact")  # the cwd is importable
    by_file = load_reward_function("my_rewards.py:exact")
    assert by_module(prompt, " 2 ") == by_file(prompt, "2") == 1.0
    for spec, message in [
        ("my_rewards", r"expected 'module:name'"),
        ("nope_module:exact", r"no module 'nope_module'"),
        ("my_rewards:exat", r"my_rewards has no 'exat'; it has \[.*'exact'"),
        ("missing.py:exact", r"no file .*missing.py"),
        ("my_rewards:one_argument", r"called as reward\(prompt, completion\)"),
        ("my_rewards:Fixed", r"is a type, not a function"),
    ]:
        with pytest.raises(ValueError, match=message) as caught:
            load_reward_function(spec)
        assert f"rl.reward={spec!r}" in str(caught.value)


def test_a_task_class_is_built_and_checked(user_module) -> None:
    task = load_task("my_rewards:Fixed")
    assert task.reward(task.train_prompts()[0], "") == 0.5
    with pytest.raises(ValueError, match=r"without \['eval_prompts', 'reward'\]"):
        load_task("my_rewards:NoReward")


def test_the_probe_catches_a_reward_that_breaks_or_is_not_a_number(user_module) -> None:
    prompt = TaskPrompt(messages=({"role": "user", "content": "1+1"},), answer="2")
    for name, message in [("needs_tests", "raised KeyError"), ("says_yes", "returned 'yes'")]:
        task = RewardFunctionTask([prompt], [prompt], load_reward_function(f"my_rewards:{name}"))
        with pytest.raises(ValueError, match=message):
            probe_reward(task, prompt, f"rl.reward='my_rewards:{name}'")
    probe_reward(
        RewardFunctionTask([prompt], [], load_reward_function("my_rewards:exact")), prompt, "x"
    )
    assert load_object("my_rewards:Fixed", "rl.task") is sys.modules["my_rewards"].Fixed


USER_REWARD = '''
"""A reward a user writes: it logs each call so the test can check what reached it."""
import json

def score(prompt, completion):
    assert prompt.answer is not None and prompt.metadata["level"] >= 1, prompt
    value = min(len(completion), 6) / 6
    with open("calls.jsonl", "a") as log:
        log.write(json.dumps({"where": prompt.prompt_id, "reward": value}) + "\\n")
    return value
'''

USER_CONFIG = """
from rollouts.recipes.config import DataConfig, ModelConfig, RLStageConfig, TrainConfig
from rollouts.rl import RLTrainingConfig

config = TrainConfig(
    model=ModelConfig(name="{model}"),
    data=DataConfig(train_path="prompts_train.jsonl", val_path="prompts_val.jsonl"),
    rl=RLStageConfig(
        enabled=True, reward="my_reward:score", learning_rate=1e-3, engine_mode="thread",
        training=RLTrainingConfig(num_steps=3, prompts_per_step=4, group_size=4, max_tokens=6,
                                  eval_every_steps=0, progress_bar=False),
    ),
    skip_sft=True,
    output_dir="run",
)
"""


def _tiny_model(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rollouts.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tokenizer),
                         **ids)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_rollouts_train_runs_rl_with_the_users_reward_module(tmp_path) -> None:
    _tiny_model(tmp_path / "model")
    for split, count in (("train", 8), ("val", 5)):
        records = [{"prompt": f"{i}+1", "answer": str(i + 1), "level": 1} for i in range(count)]
        _write_jsonl(tmp_path / f"prompts_{split}.jsonl", records)
    (tmp_path / "my_reward.py").write_text(textwrap.dedent(USER_REWARD))
    (tmp_path / "rl_config.py").write_text(USER_CONFIG.format(model=tmp_path / "model"))
    command = [sys.executable, "-m", "rollouts.cli", "train", "rl_config.py"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RL accuracy (greedy), validation split (prompts_val.jsonl, 5 prompts)" in done.stdout
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    train_calls = [c for c in calls if "prompts_train.jsonl" in c["where"]]
    val_calls = [c for c in calls if "prompts_val.jsonl" in c["where"]]
    assert len(train_calls) == 1 + 3 * 4 * 4  # the start-up probe, then 3 steps of 4 x 4
    assert len(val_calls) == 2 * 5  # greedy before and after, on the 5 validation prompts
    steps = [r for r in _read_jsonl(tmp_path / "run" / "rl" / "metrics.jsonl") if r["step"] > 0]
    first_step = [c["reward"] for c in train_calls[1:17]]  # sync: step 1 samples come first
    assert steps[0]["reward_mean"] == pytest.approx(sum(first_step) / 16, abs=1e-12)
    assert (tmp_path / "run" / "rl" / "final_model" / "tokenizer_config.json").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists(), "skip_sft ran no SFT stage"


def test_a_misspelled_reward_fails_before_any_stage_runs(tmp_path) -> None:
    _tiny_model(tmp_path / "model")
    _write_jsonl(tmp_path / "prompts_train.jsonl", [{"prompt": "1+1", "answer": "2", "level": 1}])
    _write_jsonl(tmp_path / "prompts_val.jsonl", [{"prompt": "1+2", "answer": "3", "level": 1}])
    (tmp_path / "my_reward.py").write_text(textwrap.dedent(USER_REWARD))
    (tmp_path / "rl_config.py").write_text(USER_CONFIG.format(model=tmp_path / "model"))
    command = [sys.executable, "-m", "rollouts.cli", "train", "rl_config.py",
               "--rl.reward", "my_reward:scor"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    assert "rl.reward='my_reward:scor': my_reward has no 'scor'" in done.stderr
    assert not (tmp_path / "run").exists(), "nothing was written before the check"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_shipped_own_reward_config_and_task_class_build(tmp_path) -> None:
    from rollouts.recipes import train

    repo = Path(__file__).resolve().parents[1]
    config_04 = repo / "dev" / "integration_training" / "configs" / "04_sft_rl_own_reward.py"
    config = train.load_config(str(config_04), ["--output_dir", str(tmp_path / "run")])
    rl_task = train.build_rl_task(config)
    prompt = rl_task.test[0]
    assert rl_task.task.reward(prompt, prompt.answer) == 1.0
    eighty_five = TaskPrompt(messages=({"role": "user", "content": "40+45"},), answer="85")
    by_hand = {"85": 1.0, " 85\n": 1.0, "75": 0.5 * 1 / 2, "185": 0.5 * 2 / 3, "58": 0.0, "": 0.0}
    for completion, credit in by_hand.items():
        assert rl_task.task.reward(eighty_five, completion) == pytest.approx(credit), completion
    spec = f"{repo / 'dev' / 'integration_training' / 'rewards.py'}:GeneratedAddition"
    with_task = train.load_config(
        str(config_04),
        ["--output_dir", str(tmp_path / "run"), "--rl.reward", "", "--rl.task", spec],
    )
    task = train.build_rl_task(with_task).task
    assert len(task.train_prompts()) == 2000 and type(task).__name__ == "GeneratedAddition"
