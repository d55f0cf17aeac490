"""`dev/integration_training/train.py` end to end: the 01 config (SFT then RL), shrunk by
command-line overrides, in a subprocess; and a bad override named in the error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from rollouts.training.backends import load_hf_model

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "dev" / "integration_training" / "train.py"
CONFIG_01 = REPO / "dev" / "integration_training" / "configs" / "01_debug_sft_rl.py"
SHRINK = [
    "--sft.max_steps", "30", "--sft.eval_every_steps", "15", "--sft.save_every_steps", "0",
    "--data.accuracy_examples", "20",
    "--rl.training.num_steps", "4", "--rl.training.prompts_per_step", "8",
    "--rl.training.eval_every_steps", "2", "--rl.training.eval_max_prompts", "20",
    "--rl.training.checkpoint_every_steps", "0",
    "--rl.test_examples", "20", "--rl.engine_mode", "thread",
]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def run_train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TRAIN), str(CONFIG_01), *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip


def test_sft_then_rl_writes_both_stages(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_train(*SHRINK, "--output_dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "validation loss: " in done.stdout and "RL model" in done.stdout, done.stdout
    sft_records = read_jsonl(out / "metrics.jsonl")
    assert max(r["step"] for r in sft_records if "loss" in r) == 30
    rl_records = read_jsonl(out / "rl" / "metrics.jsonl")
    steps = [r for r in rl_records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # Async with max_steps_off_policy=1: the first step on-policy, later ones one version back.
    assert steps[0]["staleness_hist"] == {"0": 64}
    assert all(set(r["staleness_hist"]) <= {"0", "1"} for r in steps)
    assert [r["step"] for r in rl_records if "eval_accuracy" in r] == [0, 2, 4]
    for name in ("metrics.png", "rl/metrics.png", "rl/checkpoints/step_00000004"):
        assert (out / name).exists(), name
    # 30 SFT steps answer no question right: every group is all-wrong, has zero advantage and is
    # dropped, so RL must leave the weights exactly as SFT left them (RL learning itself is
    # covered in test_rl_loop.py).
    assert all(r["frac_all_wrong"] == 1.0 and r["groups_trained"] == 0 for r in steps)
    sft_model = load_hf_model(out / "final_model", torch.float32, None).state_dict()
    rl_model = load_hf_model(out / "rl" / "final_model", torch.float32, None).state_dict()
    assert all(torch.equal(sft_model[k], rl_model[k]) for k in sft_model)


def test_a_bad_override_names_the_field(tmp_path: Path) -> None:
    done = run_train("--rl.loss", "reinforce", "--output_dir", str(tmp_path / "bad"))
    assert done.returncode != 0
    assert "rl.loss='reinforce'; must be one of" in done.stderr


def _train_module():
    """The command's module, for its run-directory guards (no subprocess needed)."""
    from rollouts.recipes import train

    return train


def _config(train: object, out: Path, *args: str):
    return train.load_config(str(CONFIG_01), ["--output_dir", str(out), *args])


def test_a_rerun_refuses_and_names_resume_and_overwrite(tmp_path: Path) -> None:
    train = _train_module()
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000010").mkdir(parents=True)  # an earlier run's work
    (out / "metrics.jsonl").write_text("{}\n")
    try:
        train.prepare_output_dir(_config(train, out))
    except FileExistsError as error:
        assert "--sft.resume" in str(error) and "--overwrite" in str(error)
    else:
        raise AssertionError("a rerun without --sft.resume or --overwrite must refuse")
    assert (out / "checkpoints" / "step_00000010").is_dir(), "nothing was deleted"


def test_a_second_run_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    import fcntl

    train = _train_module()
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / train.LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a run that is still going
        held.write("pid 4242")
        held.flush()
        try:
            train.prepare_output_dir(_config(train, out, "--overwrite"))
        except RuntimeError as error:
            assert "in use by a run that is still going (pid 4242)" in str(error)
        else:
            raise AssertionError("a second run on a locked directory must refuse")


def test_a_fresh_rl_stage_refuses_a_directory_holding_another_rl_run(tmp_path: Path) -> None:
    train = _train_module()
    out = tmp_path / "run"
    (out / "rl" / "checkpoints" / "step_00000004").mkdir(parents=True)
    try:
        train.refuse_an_earlier_rl_run(_config(train, out), out)
    except FileExistsError as error:
        assert "--rl.training.resume" in str(error)
    else:
        raise AssertionError("a fresh RL stage must not write into another RL run")
    resuming = _config(train, out, "--rl.training.resume")
    train.refuse_an_earlier_rl_run(resuming, out)  # continuing that run is fine


def test_a_bad_dtype_or_device_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    train = _train_module()
    for flag, value, field in [
        ("--model.dtype", "float64", "model.dtype='float64'"),
        ("--target.device_type", "gpu", "target.device_type='gpu'"),
        ("--data.mask_mode", "guess", "data.mask_mode='guess'"),
        ("--target.threads", "many", "target.threads='many'"),
        ("--lora.rank", "-2", "lora.rank=-2"),
    ]:
        try:
            _config(train, tmp_path / "x", flag, value)
        except (ValueError, SystemExit) as error:
            assert field in str(error) + capsys.readouterr().err
        else:
            raise AssertionError(f"{flag} {value} must be refused")


def test_rollouts_sft_fine_tunes_a_local_model_on_a_chat_file(tmp_path: Path) -> None:
    """The no-config path a user types: a model directory (with its tokenizer and chat
    template) and a JSONL file; then the same command again refuses to overwrite the run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rollouts.data.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model_dir = tmp_path / "my_model"
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         **ids)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = REPO / "dev" / "integration_training" / "data"
    command = [
        sys.executable, "-m", "rollouts.cli", "sft", "--model", str(model_dir),
        "--train", str(data / "addition_train.jsonl"), "--val", str(data / "addition_val.jsonl"),
        "--max-steps", "6", "--max-length", "32", "--learning-rate", "1e-3",
        "--output", str(tmp_path / "run"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SFT summary: 6 steps" in done.stdout and "validation loss: " in done.stdout
    exported = tmp_path / "run" / "final_model"
    assert (exported / "tokenizer_config.json").is_file() and (
        exported / "model.safetensors"
    ).is_file()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    lora = [*command, "--overwrite", "--lora-rank", "4", "--max-steps", "3"]
    with_lora = subprocess.run(lora, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert with_lora.returncode == 0, with_lora.stderr[-3000:]
    meta = tmp_path / "run" / "checkpoints" / "step_00000003" / "meta.json"
    assert json.loads(meta.read_text())["weights"] == "trained"


def test_every_subcommand_prints_its_help(capsys) -> None:
    from rollouts.cli import main as cli_main

    for command in (["--help"], ["train", "--help"], ["sft", "--help"], ["plot", "--help"]):
        try:
            cli_main(command)
        except SystemExit as done:
            assert done.code == 0, command
        assert "usage: rollouts" in capsys.readouterr().out


def test_the_lora_config_trains_and_syncs_adapters_in_both_stages(tmp_path: Path) -> None:
    config_02 = CONFIG_01.parent / "02_debug_sft_rl_lora.py"
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(TRAIN), str(config_02), *SHRINK, "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for checkpoint in (out / "checkpoints" / "step_00000030", out / "rl" / "checkpoints" /
                       "step_00000004"):  # fmt: skip
        assert json.loads((checkpoint / "meta.json").read_text())["weights"] == "trained"
    merged = load_hf_model(out / "rl" / "final_model", torch.float32, None)
    assert not any("lora" in name for name in merged.state_dict()), "exported merged"
    full_bytes = sum(t.numel() * t.element_size() for t in merged.state_dict().values())
    steps = [r for r in read_jsonl(out / "rl" / "metrics.jsonl") if r["step"] > 0]
    # Rank 32 of 128 on every linear layer, the head and the embedding: about half the bytes.
    assert all(0 < r["weight_sync_bytes"] < 0.75 * full_bytes for r in steps)


def test_auto_threads_are_timed_once_per_run_and_reused_on_resume(tmp_path: Path) -> None:
    train = _train_module()
    out = tmp_path / "run"
    out.mkdir()
    chosen = train.sft_trainer_threads(_config(train, out), out, None)
    assert 1 <= chosen <= torch.get_num_threads()
    assert json.loads((out / train.THREADS_FILE).read_text()) == {"sft_trainer_threads": chosen}
    (out / train.THREADS_FILE).write_text(json.dumps({"sft_trainer_threads": 7}))
    resumed = _config(train, out, "--sft.resume")
    assert train.sft_trainer_threads(resumed, out, None) == 7, "a resume rounds like its run"
    assert train.sft_trainer_threads(_config(train, out, "--target.threads", "3"), out, None) == 3
