"""Loss masks from chat templates without `{% generation %}` tags, one test per template family.

Each template is written here in its family's published format and used with a small byte-level
BPE tokenizer trained in memory. Each expected mask is written by hand as the rendered text in
pieces, a weight on each: the pieces are tokenised one by one, so the expected ids and mask do not
come from the code under test.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rollouts.data import SFTDataError, TokenizedExample, load_sft_dataset, tokenize_records

CORPUS = [
    "system user assistant model tool ipython You are a helpful assistant.",
    "What is the capital of France? Paris. And of Italy? Rome. Be terse.",
    "Weather in Paris? get_weather(city='Paris') {\"temp\": 21} It is 21 degrees.",
    "Think step by step. The answer is 4. 2+2 is 4. 3+3 is 6.",
]

# -- templates -----------------------------------------------------------------------------------

# SmolLM2-Instruct: ChatML, with a default system prompt when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2.5-Instruct (without the tool-schema block): ChatML, a default system prompt, and tool
# results as a user turn of <tool_response> blocks.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}"
    "{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3 (without the tool-schema block): reasoning is kept only after the last user query, the
# final reply always gets a think block, and enable_thinking=False puts an empty one in the
# generation prompt.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') "
    "+ '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Llama 3.1 Instruct (without tools): a system header always, dated; tool results as ipython.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool') %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Gemma 3: no system role; a system message is folded into the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Gemma 2: refuses a system message.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Mistral Instruct v0.2: [INST] ... [/INST], the reply and </s>; the system message is folded
# into the first user turn. No generation prompt: the prompt ends with [/INST].
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)
# The same, but the system message goes only into a final user turn: the prompt of the first
# reply then holds it while the rendered conversation does not.
MISTRAL_SYSTEM_LAST_TEMPLATE = MISTRAL_TEMPLATE.replace(
    "loop.first and system", "loop.last and system"
)

CHATML_SPECIALS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
CHATML_EXTRA = ["<|im_start|>"]


def bpe_tokenizer(
    template: str,
    specials: dict[str, str],
    extra_specials: Sequence[str] = (),
    plain_added: Sequence[str] = (),
    trim_offsets: bool = False,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS, with the given special and plain added tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if trim_offsets:  # as GPT-2's tokenizer does: offsets leave out a token's leading space
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=[*specials.values(), *extra_specials],  # added as special tokens
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_tokens(list(plain_added))  # added, but not special (like Qwen3's <think>)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        chat_template=template,
        clean_up_tokenization_spaces=False,
        **specials,
    )


def one_example(tokenizer: Any, messages: list[dict[str, str]], **options: Any) -> TokenizedExample:
    (example,) = tokenize_records([{"messages": messages}], tokenizer, 1024, **options).examples
    return example


def masked_runs(example: TokenizedExample, tokenizer: Any) -> list[str]:
    """The text of each run of consecutive loss-carrying tokens."""
    runs: list[list[int]] = []
    for index, (token, weight) in enumerate(zip(example.input_ids, example.loss_mask, strict=True)):
        if weight and (index == 0 or not example.loss_mask[index - 1]):
            runs.append([])
        if weight:
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs]


def assert_mask(
    tokenizer: Any,
    messages: list[dict[str, str]],
    pieces: list[tuple[str, int]],
    **options: Any,
) -> None:
    """The example is the pieces' text, tokenised as a whole; the weight-1 pieces carry the loss.

    No two weight-1 pieces are adjacent, so each is one run of masked tokens.
    """
    template_kwargs = options.get("chat_template_kwargs") or {}
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    assert rendered == "".join(text for text, _ in pieces), "the pieces must be the rendering"
    example = one_example(tokenizer, messages, **options)
    assert masked_runs(example, tokenizer) == [text for text, weight in pieces if weight]
    expected_ids: list[int] = []
    expected_mask: list[int] = []
    for text, weight in pieces:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        expected_ids += ids
        expected_mask += [weight] * len(ids)
    assert list(example.input_ids) == expected_ids
    assert list(example.loss_mask) == expected_mask


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


# -- ChatML ---------------------------------------------------------------------------------------


def test_chatml_default_system_prompt_multi_turn() -> None:
    tokenizer = bpe_tokenizer(SMOLLM2_TEMPLATE, CHATML_SPECIALS, CHATML_EXTRA)
    messages = chat(
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome."),
    )
    # The default system prompt, the user turns and each newline after <|im_end|> carry no loss.
    assert_mask(
        tokenizer,
        messages,
        [
            ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
             "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
             "<|im_start|>assistant\n", 0),
            ("Paris.<|im_end|>", 1),
            ("\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n", 0),
            ("Rome.<|im_end|>", 1),
            ("\n", 0),
        ],
    )  # fmt: skip


def test_chatml_tool_turn_between_assistant_turns() -> None:
    tokenizer = bpe_tokenizer(QWEN25_TEMPLATE, CHATML_SPECIALS, CHATML_EXTRA)
    messages = chat(
        ("user", "Weather in Paris?"),
        ("assistant", "get_weather(city='Paris')"),
        ("tool", '{"temp": 21}'),
        ("assistant", "It is 21 degrees."),
    )
    assert_mask(
        tokenizer,
        messages,
        [
            ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
             "assistant.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
             "<|im_start|>assistant\n", 0),
            ("get_weather(city='Paris')<|im_end|>", 1),
            ('\n<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
             "<|im_start|>assistant\n", 0),
            ("It is 21 degrees.<|im_end|>", 1),
            ("\n", 0),
        ],
    )  # fmt: skip


def test_chatml_given_system_prompt_replaces_the_default() -> None:
    tokenizer = bpe_tokenizer(QWEN25_TEMPLATE, CHATML_SPECIALS, CHATML_EXTRA)
    messages = chat(("system", "Be terse."), ("user", "2+2?"), ("assistant", "4"))
    assert_mask(
        tokenizer,
        messages,
        [
            ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
             "<|im_start|>assistant\n", 0),
            ("4<|im_end|>", 1),
            ("\n", 0),
        ],
    )  # fmt: skip


# -- Llama 3 --------------------------------------------------------------------------------------


def test_llama3_headers_with_tool_turn() -> None:
    # eos is <|end_of_text|>, as in the base model's tokenizer: a turn still ends at <|eot_id|>.
    tokenizer = bpe_tokenizer(
        LLAMA31_TEMPLATE,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
         "pad_token": "<|finetune_right_pad_id|>"},
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    )  # fmt: skip
    messages = chat(
        ("system", "Be terse."),
        ("user", "Weather in Paris?"),
        ("assistant", "get_weather(city='Paris')"),
        ("tool", '{"temp": 21}'),
        ("assistant", " It is 21 degrees. "),  # trimmed by the template
    )
    assert_mask(
        tokenizer,
        messages,
        [
            ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
             "Date: December 2023\nToday Date: 01 Jan 2025\n\nBe terse.<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
            ("get_weather(city='Paris')<|eot_id|>", 1),
            ('<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|>'
             "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
            ("It is 21 degrees.<|eot_id|>", 1),
        ],
        chat_template_kwargs={"date_string": "01 Jan 2025"},
    )  # fmt: skip


# -- Gemma ----------------------------------------------------------------------------------------

GEMMA_SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
GEMMA_EXTRA = ["<start_of_turn>", "<end_of_turn>"]


def test_gemma_system_folded_into_first_user_turn() -> None:
    tokenizer = bpe_tokenizer(GEMMA3_TEMPLATE, GEMMA_SPECIALS, GEMMA_EXTRA)
    messages = chat(
        ("system", "Be terse."),
        ("user", "What is the capital of France?"),
        ("assistant", "Paris.\n"),  # trimmed by the template
        ("user", "And of Italy?"),
        ("assistant", "Rome."),
    )
    # The reply ends at <end_of_turn> (eos is <eos>); the newline after it is template text.
    assert_mask(
        tokenizer,
        messages,
        [
            ("<bos><start_of_turn>user\nBe terse.\n\nWhat is the capital of France?<end_of_turn>\n"
             "<start_of_turn>model\n", 0),
            ("Paris.<end_of_turn>", 1),
            ("\n<start_of_turn>user\nAnd of Italy?<end_of_turn>\n<start_of_turn>model\n", 0),
            ("Rome.<end_of_turn>", 1),
            ("\n", 0),
        ],
    )  # fmt: skip


def test_gemma_template_refusing_system_names_the_line(tmp_path: Path) -> None:
    tokenizer = bpe_tokenizer(GEMMA2_TEMPLATE, GEMMA_SPECIALS, GEMMA_EXTRA)
    plain = chat(("user", "2+2?"), ("assistant", "4"))
    assert_mask(
        tokenizer,
        plain,
        [("<bos><start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n", 0),
         ("4<end_of_turn>", 1), ("\n", 0)],
    )  # fmt: skip
    path = write_jsonl(
        tmp_path / "g.jsonl",
        [{"messages": plain}, {"messages": [{"role": "system", "content": "Be terse."}, *plain]}],
    )
    with pytest.raises(SFTDataError, match=r"g\.jsonl line 2: the chat template refused .*"
                       r"System role not supported"):  # fmt: skip
        load_sft_dataset(path, tokenizer, 256)
    kept = load_sft_dataset(path, tokenizer, 256, skip_bad_lines=True)
    assert len(kept) == 1 and kept.num_skipped_bad == 1


# -- Mistral --------------------------------------------------------------------------------------

MISTRAL_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def test_mistral_inst_blocks_multi_turn() -> None:
    # Offsets trimmed of leading spaces, as GPT-2-style tokenizers give them: the reply's
    # first token (" Paris") still counts as the reply's.
    tokenizer = bpe_tokenizer(MISTRAL_TEMPLATE, MISTRAL_SPECIALS, trim_offsets=True)
    tokenizer.pad_token = tokenizer.unk_token
    messages = chat(
        ("system", "Be terse."),
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome."),
    )
    assert_mask(
        tokenizer,
        messages,
        [
            ("<s> [INST] Be terse.\n\nWhat is the capital of France? [/INST]", 0),
            (" Paris.</s>", 1),
            (" [INST] And of Italy? [/INST]", 0),
            (" Rome.</s>", 1),
        ],
    )  # fmt: skip


def test_template_breaking_the_prefix_names_line_and_turn(tmp_path: Path) -> None:
    tokenizer = bpe_tokenizer(MISTRAL_SYSTEM_LAST_TEMPLATE, MISTRAL_SPECIALS)
    tokenizer.pad_token = tokenizer.unk_token
    plain = chat(("user", "2+2?"), ("assistant", "4"))
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": plain}, {"messages": [{"role": "system", "content": "Be terse."}, *plain]}],
    )
    with pytest.raises(
        SFTDataError,
        match=r"m\.jsonl line 2: messages\[2\] \(assistant\): the template's generation prompt is "
        r"not how it begins this turn: .* part at character 11 \('<s> \[INST\] Be terse",
    ):
        load_sft_dataset(path, tokenizer, 256)


# -- Qwen3 think blocks ---------------------------------------------------------------------------


def qwen3_tokenizer(think_is_special: bool = False) -> PreTrainedTokenizerFast:
    think = ["<think>", "</think>"]
    if think_is_special:  # some reasoning models' tokenizers mark them special
        return bpe_tokenizer(QWEN3_TEMPLATE, CHATML_SPECIALS, [*CHATML_EXTRA, *think])
    return bpe_tokenizer(QWEN3_TEMPLATE, CHATML_SPECIALS, CHATML_EXTRA, think)


@pytest.fixture(scope="module")
def qwen3() -> PreTrainedTokenizerFast:
    return qwen3_tokenizer()


def test_qwen3_empty_think_block_of_the_generation_prompt_is_not_learned(qwen3) -> None:
    assert_mask(
        qwen3,
        chat(("user", "2+2?"), ("assistant", "4")),
        [
            ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", 0),
            ("4<|im_end|>", 1),
            ("\n", 0),
        ],
        chat_template_kwargs={"enable_thinking": False},
    )  # fmt: skip


@pytest.mark.parametrize("think_is_special", [False, True])
def test_qwen3_reasoning_written_by_the_model_is_learned(think_is_special: bool) -> None:
    # In thinking mode the prompt ends at "assistant\n": the think block is the model's output.
    # The end of turn is the first special token after the reply, so a special <think> inside it
    # does not end it.
    tokenizer = qwen3_tokenizer(think_is_special)
    assert_mask(
        tokenizer,
        chat(("user", "2+2?"), ("assistant", "<think>\nThink step by step.\n</think>\n\n4")),
        [
            ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", 0),
            ("<think>\nThink step by step.\n</think>\n\n4<|im_end|>", 1),
            ("\n", 0),
        ],
    )  # fmt: skip
    # A reply without reasoning gets the template's empty block, which the model then emits.
    example = one_example(tokenizer, chat(("user", "2+2?"), ("assistant", "4")))
    assert masked_runs(example, tokenizer) == ["<think>\n\n</think>\n\n4<|im_end|>"]


def test_qwen3_multi_turn_history_rewrite_is_refused(qwen3, tmp_path: Path) -> None:
    # Alone, the first reply gets a think block; followed by a user turn, it does not.
    messages = chat(("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"), ("assistant", "6"))
    path = write_jsonl(tmp_path / "q.jsonl", [{"messages": messages}])
    with pytest.raises(
        SFTDataError,
        match=r"q\.jsonl line 1: messages\[1\] \(assistant\): the template renders this turn "
        r"differently once later messages follow: .* one record per assistant turn",
    ):
        load_sft_dataset(path, qwen3, 256, chat_template_kwargs={"enable_thinking": False})


# -- boundaries and options -----------------------------------------------------------------------


def test_token_straddling_prompt_and_reply_is_in_and_ids_are_the_whole_rendering() -> None:
    # No pre-tokenizer split and a "\n\n" merge: the prompt's final newline and a reply starting
    # with one become a single token, which the prompt and the reply tokenised apart never give.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(alphabet)}
    vocab["ĊĊ"] = len(vocab)  # "\n\n" in byte-level characters
    model = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    model.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model,
        chat_template=SMOLLM2_TEMPLATE,
        clean_up_tokenization_spaces=False,
        **CHATML_SPECIALS,
    )
    messages = chat(("system", "s"), ("user", "u"), ("assistant", "\nok"))
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    apart = tokenizer(prompt).input_ids + tokenizer(whole[len(prompt) :]).input_ids
    example = one_example(tokenizer, messages)
    assert list(example.input_ids) == tokenizer(whole).input_ids != apart
    assert masked_runs(example, tokenizer) == ["\n\nok<|im_end|>"]


def test_assistant_first_message_is_refused() -> None:
    tokenizer = bpe_tokenizer(SMOLLM2_TEMPLATE, CHATML_SPECIALS, CHATML_EXTRA)
    with pytest.raises(SFTDataError, match=r"record 1: messages\[0\] is an assistant reply with"):
        tokenize_records([{"messages": chat(("assistant", "Hi."))}], tokenizer, 64)


def test_reserved_template_kwargs_are_refused() -> None:
    tokenizer = bpe_tokenizer(SMOLLM2_TEMPLATE, CHATML_SPECIALS, CHATML_EXTRA)
    with pytest.raises(ValueError, match=r"chat_template_kwargs sets \['add_generation_prompt'\]"):
        tokenize_records(
            [{"prompt": "a", "completion": "b"}],
            tokenizer,
            64,
            chat_template_kwargs={"add_generation_prompt": True},
        )
