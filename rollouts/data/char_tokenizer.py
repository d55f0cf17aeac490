"""A character-level tokenizer with a chat template, built offline with the `tokenizers` library.

Every printable ASCII character (and newline) is one token, so tiny models trained on short
tasks (arithmetic, string reversal) need no download and no trained vocabulary. The chat template
wraps each assistant reply (and the EOS that ends it) in `{% generation %}`, which is what
`apply_chat_template(..., return_assistant_tokens_mask=True)` needs to mark the tokens that carry
the SFT loss.

A conversation renders as (one character per token, special tokens whole):

    <bos>S:system text\\nU:37+48\\nA:85<eos>U:next question\\nA:...

`add_generation_prompt=True` ends the text with `A:`, so a model's completion is the reply itself.
"""

from __future__ import annotations

import string
from typing import Any

__all__ = ["CHAR_CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_char_tokenizer"]

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}
DEFAULT_CHARS = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")  # 95 + newline

# Roles render as one letter and a colon; only the assistant's reply (and its EOS) is generated.
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "A:{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] == 'system' %}S:{{ message['content'] }}\n"
    "{% else %}U:{{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def build_char_tokenizer(chars: str = DEFAULT_CHARS, model_max_length: int = 512) -> Any:
    """A `PreTrainedTokenizerFast` with one token per character of `chars` plus the specials.

    Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then `chars` in order. It saves with
    `save_pretrained` and reloads offline with `AutoTokenizer.from_pretrained`.
    """
    # Imported here: transformers costs about half a second, and `rollouts.data` is imported by
    # `rollouts.training` whether or not a tokenizer is built.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(chars)) != len(chars):
        raise ValueError(f"chars must not repeat a character, got {chars!r}")
    specials = list(SPECIAL_TOKENS.values())
    vocab = {token: index for index, token in enumerate([*specials, *chars])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # Splitting on the empty pattern isolates every character as its own piece.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(""), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        padding_side="left",  # generation pads on the left so replies start at the same column
        chat_template=CHAR_CHAT_TEMPLATE,
        **SPECIAL_TOKENS,
    )
    return wrapped
