"""SFT data: chat-template masks, bad-input messages, truncation, batching, packing, the task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rollouts.data import (
    SFTDataError,
    build_char_tokenizer,
    collate_packed,
    collate_padded,
    epoch_order,
    load_sft_dataset,
    plan_micro_batches,
    tokenize_records,
)
from rollouts.tasks import addition
from rollouts.training.losses import cross_entropy_loss

MULTI_TURN = [
    {"role": "system", "content": "add"},
    {"role": "user", "content": "1+2"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "10+5"},
    {"role": "assistant", "content": "15"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def chat_line(user: str, assistant: str) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        }
    )


# -- tokenizer and mask ---------------------------------------------------------------------------


def test_char_tokenizer_saves_and_reloads_offline(tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "12+34=46 Hello!"
    assert reloaded(text, add_special_tokens=False).input_ids == tokenizer(text).input_ids
    assert len(tokenizer(text).input_ids) == len(text)  # one token per character
    assert reloaded.decode(reloaded(text).input_ids) == text
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert reloaded.apply_chat_template(MULTI_TURN, tokenize=False) == (
        tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    )


def test_multi_turn_mask_covers_exactly_the_assistant_replies(tokenizer) -> None:
    dataset = tokenize_records([{"messages": MULTI_TURN}], tokenizer, max_length=128)
    (example,) = dataset.examples
    # Expected, by hand: the rendered pieces, with a 1 on each assistant character and its EOS.
    pieces = [
        ("<bos>", 0), ("S:add\n", 0), ("U:1+2\n", 0), ("A:", 0), ("3", 1), ("<eos>", 1),
        ("U:10+5\n", 0), ("A:", 0), ("15", 1), ("<eos>", 1),
    ]  # fmt: skip
    expected_ids, expected_mask = [], []
    for text, weight in pieces:
        ids = (
            [tokenizer.convert_tokens_to_ids(text)]
            if text.startswith("<")
            else [tokenizer.convert_tokens_to_ids(c) for c in text]
        )
        expected_ids += ids
        expected_mask += [weight] * len(ids)
    assert list(example.input_ids) == expected_ids
    assert list(example.loss_mask) == expected_mask


def test_prompt_completion_form_equals_messages_form(tokenizer) -> None:
    as_messages = tokenize_records([chat_line("2+2", "4")], tokenizer, 64)
    as_pair = tokenize_records([{"prompt": "2+2", "completion": "4"}], tokenizer, 64)
    assert as_messages.examples[0].input_ids == as_pair.examples[0].input_ids
    assert as_messages.examples[0].loss_mask == as_pair.examples[0].loss_mask


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", r"bad\.jsonl line 2: not valid JSON"),
        ('{"text": "hi"}', r"bad\.jsonl line 2: missing 'messages' key .* got keys \['text'\]"),
        (
            '{"messages": [{"role": "robot", "content": "x"}]}',
            r"line 2: messages\[0\] has unknown role 'robot'; expected one of \('system'",
        ),
        ('{"messages": [{"role": "user", "content": "1+1"}]}', r"line 2: no assistant message"),
        (
            '{"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": 2}]}',
            r"line 2: messages\[1\]\.content must be a string, got int",
        ),
        ('{"messages": []}', r"line 2: 'messages' must be a non-empty list"),
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
    ],
)
def test_bad_line_names_file_and_line(tokenizer, tmp_path: Path, bad_line: str, message: str):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat_line("1+1", "2"), bad_line])
    with pytest.raises(SFTDataError, match=message):
        load_sft_dataset(path, tokenizer, 64)


def untagged(tokenizer: Any) -> Any:
    """The same tokenizer with the {% generation %} tags taken out of its template."""
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    return tokenizer


def test_template_without_generation_tags_gets_the_same_mask(tokenizer) -> None:
    # Rendering turn by turn finds the tokens the tags mark: the reply and its <eos>.
    tagged = tokenize_records([{"messages": MULTI_TURN}], tokenizer, 128)
    plain = tokenize_records([{"messages": MULTI_TURN}], untagged(build_char_tokenizer()), 128)
    forced = tokenize_records([{"messages": MULTI_TURN}], tokenizer, 128, mask_mode="incremental")
    assert plain.examples[0] == tagged.examples[0] == forced.examples[0]


def test_mask_mode_is_checked(tokenizer) -> None:
    plain = untagged(build_char_tokenizer())
    with pytest.raises(ValueError, match=r"mask_mode='generation_tags' but the chat template has"):
        tokenize_records([chat_line("1+1", "2")], plain, 64, mask_mode="generation_tags")
    with pytest.raises(ValueError, match=r"mask_mode='tags'; must be one of \('auto'"):
        tokenize_records([chat_line("1+1", "2")], tokenizer, 64, mask_mode="tags")


def test_example_with_no_assistant_token(tmp_path: Path) -> None:
    # Tags around the reply alone (no <eos>) mark nothing when the reply is empty.
    bare = build_char_tokenizer()
    bare.chat_template = bare.chat_template.replace(
        "{{ eos_token }}{% endgeneration %}", "{% endgeneration %}"
    )
    path = write_jsonl(tmp_path / "d.jsonl", [chat_line("1+1", "2"), chat_line("1+1", "")])
    with pytest.raises(SFTDataError, match=r"d\.jsonl line 2: no assistant token"):
        load_sft_dataset(path, bare, 64)


def test_empty_inputs(tokenizer, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SFTDataError, match=r"empty\.jsonl: the file is empty"):
        load_sft_dataset(tmp_path / "empty.jsonl", tokenizer, 64)
    write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(SFTDataError, match=r"blank\.jsonl: no usable example \(0 line"):
        load_sft_dataset(tmp_path / "blank.jsonl", tokenizer, 64)
    with pytest.raises(SFTDataError, match="no such data file"):
        load_sft_dataset(tmp_path / "missing.jsonl", tokenizer, 64)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SFTDataError, match=r"data\.csv: unknown data file type '\.csv'"):
        load_sft_dataset(tmp_path / "data.csv", tokenizer, 64)


def test_skip_bad_lines_counts_them(tokenizer, tmp_path: Path) -> None:
    lines = [chat_line("1+1", "2"), "{oops", "", '{"x": 1}', chat_line("2+2", "4")]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    dataset = load_sft_dataset(path, tokenizer, 64, skip_bad_lines=True)
    assert len(dataset) == 2 and dataset.num_skipped_bad == 2 and dataset.num_records == 4
    assert "mixed.jsonl line 2" in dataset.skipped_messages[0]
    assert "mixed.jsonl line 4" in dataset.skipped_messages[1]
    assert [e.where for e in dataset.examples] == [f"{path} line 1", f"{path} line 5"]


def test_overlong_truncate_and_drop(tokenizer) -> None:
    records = [chat_line("1+1", "2"), chat_line("1" * 20 + "+1", "1" * 19 + "2")]
    kept = tokenize_records(records, tokenizer, max_length=30, overlong="truncate")
    assert kept.num_truncated == 1 and kept.num_dropped_overlong == 0 and len(kept) == 2
    assert len(kept.examples[1].input_ids) == 30 and any(kept.examples[1].loss_mask)
    dropped = tokenize_records(records, tokenizer, max_length=30, overlong="drop")
    assert dropped.num_dropped_overlong == 1 and len(dropped) == 1
    # Truncated before any assistant token: nothing to learn, so dropped and counted.
    cut = tokenize_records(records, tokenizer, max_length=12, overlong="truncate")
    assert cut.num_dropped_overlong == 1 and cut.num_truncated == 0
    with pytest.raises(ValueError, match="overlong='cut'"):
        tokenize_records(records, tokenizer, 30, overlong="cut")


def test_parquet_file(tokenizer, tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": "1+1", "completion": "2"}, {"prompt": "3+4", "completion": "7"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    dataset = load_sft_dataset(tmp_path / "d.parquet", tokenizer, 64)
    assert len(dataset) == 2 and dataset.examples[1].where.endswith("d.parquet row 2")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    from_disk = load_sft_dataset(tmp_path / "saved", tokenizer, 64)
    assert [e.input_ids for e in from_disk.examples] == [e.input_ids for e in dataset.examples]


# -- batching -------------------------------------------------------------------------------------


def test_padded_collate_shifts_and_masks(tokenizer) -> None:
    data = tokenize_records([chat_line("1+1", "2"), chat_line("10+20", "30")], tokenizer, 64)
    batch = collate_padded(data.examples, data.pad_token_id, with_loss_mask=True)
    short, long = data.examples
    assert batch["input_ids"].shape == (2, len(long.input_ids) - 1)
    for row, example in enumerate(data.examples):
        n = len(example.input_ids) - 1
        assert batch["input_ids"][row, :n].tolist() == list(example.input_ids[:-1])
        for t in range(n):  # labels[t] is the next token where that token carries loss
            expected = example.input_ids[t + 1] if example.loss_mask[t + 1] else -100
            assert batch["labels"][row, t].item() == expected
            assert batch["loss_mask"][row, t].item() == example.loss_mask[t + 1]
    pad_from = len(short.input_ids) - 1
    assert (batch["labels"][0, pad_from:] == -100).all()
    assert batch["attention_mask"][0].tolist() == [1] * pad_from + [0] * (
        batch["input_ids"].shape[1] - pad_from
    )
    same_length = collate_padded([long, long], data.pad_token_id)
    assert "attention_mask" not in same_length  # no padding: no mask, the fast causal path
    assert "loss_mask" not in same_length  # 0/1 weights ride in the labels by default
    # Either way the loss is the same.
    logits = torch.randn(*batch["labels"].shape, len(tokenizer), generator=torch.Generator())
    without = {k: v for k, v in batch.items() if k != "loss_mask"}
    loss_with, loss_without = cross_entropy_loss(logits, batch), cross_entropy_loss(logits, without)
    torch.testing.assert_close(loss_with, loss_without)


def test_packing_blocks_attention_across_examples(tokenizer) -> None:
    records = [chat_line(f"{a}+{a * 3}", str(a * 4)) for a in (7, 123, 45, 9)]
    data = tokenize_records(records, tokenizer, max_length=40)
    plans = plan_micro_batches(data, [0, 1, 2, 3], micro_batch_size=4, packing=True)
    rows = [[data.examples[i] for i in row] for row in plans[0]]
    assert any(len(row) > 1 for row in rows), "the test needs a row holding several examples"
    packed = collate_packed(rows, data.pad_token_id, data.max_length - 1, with_loss_mask=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
        )
    ).eval()  # fmt: skip
    with torch.no_grad():
        # Without a KV cache: with one, transformers does not derive the packed mask (see
        # rollouts.data.batching; the backends run every forward without one).
        packed_logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        padded = collate_padded(data.examples, data.pad_token_id)
        alone_logits = model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]
        ).logits
    for row, row_examples in enumerate(rows):
        start = 0
        for example in row_examples:
            index = data.examples.index(example)
            n = len(example.input_ids) - 1
            torch.testing.assert_close(
                packed_logits[row, start : start + n], alone_logits[index, :n], atol=1e-5, rtol=0
            )
            start += n
    # The same tokens carry the loss either way, so the token-mean loss is the same.
    loss_packed = cross_entropy_loss(packed_logits, packed)
    loss_padded = cross_entropy_loss(alone_logits, padded)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=0)


def test_epoch_order_is_seeded() -> None:
    assert epoch_order(50, seed=3, epoch=1) == epoch_order(50, seed=3, epoch=1)
    assert epoch_order(50, seed=3, epoch=1) != epoch_order(50, seed=3, epoch=2)
    assert epoch_order(50, seed=3, epoch=1) != epoch_order(50, seed=4, epoch=1)
    assert sorted(epoch_order(50, seed=3, epoch=1)) == list(range(50))
    assert epoch_order(5, seed=3, epoch=1, shuffle=False) == [0, 1, 2, 3, 4]


# -- the addition task ----------------------------------------------------------------------------


def test_addition_splits_never_overlap_and_are_reproducible() -> None:
    train = addition.generate_examples("train", 3000, seed=0, num_digits=2)
    val = addition.generate_examples("val", 300, seed=0, num_digits=2)
    test = addition.generate_examples("test", 300, seed=7, num_digits=2)
    keys = [{(e.a, e.b) for e in split} for split in (train, val, test)]
    assert all(len(k) == n for k, n in zip(keys, (3000, 300, 300), strict=True))
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    assert addition.generate_examples("val", 300, seed=0, num_digits=2) == val
    with pytest.raises(ValueError, match="could draw only"):
        addition.generate_examples("val", 5000, seed=0, num_digits=2)


def test_shipped_data_matches_the_generator() -> None:
    data_dir = Path(__file__).resolve().parents[1] / "dev" / "integration_training" / "data"
    lines = (data_dir / "addition_val.jsonl").read_text().splitlines()
    first = json.loads(lines[0])["messages"]
    assert addition.answer_for(first[0]["content"]) == first[1]["content"]
    train_prompts = {
        json.loads(line)["messages"][0]["content"]
        for line in (data_dir / "addition_train.jsonl").read_text().splitlines()
    }
    val_prompts = {json.loads(line)["messages"][0]["content"] for line in lines}
    assert len(train_prompts) >= 1000 and not train_prompts & val_prompts


def test_addition_reward() -> None:
    assert addition.reward("37+48", " 85\n") == 1.0
    assert addition.reward("37+48", "84") == 0.0
    assert addition.reward("37+48", "85 apples") == 0.0
    prompt = addition.AdditionExample(37, 48).task_prompt()
    assert addition.reward(prompt, "85") == 1.0
    with pytest.raises(ValueError, match="not an addition question: 'hello'"):
        addition.answer_for("hello")
