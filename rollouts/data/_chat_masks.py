"""Assistant-only loss masks from a chat template: its `{% generation %}` blocks, or by rendering.

Two ways to find the tokens an SFT loss learns from (the assistant's replies):

- **generation tags**: a template that wraps replies in `{% generation %}` blocks says so itself;
  `apply_chat_template(..., return_assistant_tokens_mask=True)` reads them.
- **incremental rendering**, for templates without tags (almost all shipped ones). The sequence
  trained on is the rendering of the whole conversation, tokenised once. For each assistant
  message i, the prompt P is `messages[:i]` rendered with `add_generation_prompt=True` and the turn
  F is `messages[:i + 1]` rendered without it. P must be a prefix of F, and the whole rendering
  must agree with F through the turn's end-of-turn token; the turn is the text of F after P, up to
  and including that token. Tokens whose characters overlap the turn are masked in.

The prefix checks compare text, and the whole rendering is tokenised once with character offsets:
comparing P and F as separately tokenised ids would fail, or shift the boundary, wherever BPE
merges the prompt's last characters with the reply's first ("\n" + "\n..."), and the ids trained
on would not be those of the conversation.

The end-of-turn token is the first special token (the tokenizer's named special tokens and the
added tokens marked special: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`) that the
template writes after the reply text; the tokenizer's eos alone would miss Gemma's
`<end_of_turn>` and Llama 3's `<|eot_id|>` under a base-model eos. Template text after it
(ChatML's newline) is never sampled, since generation stops at that token, so it is masked out.
When the template writes no special token after the reply, the whole rendered turn is masked in.

What falls out of the rule: a default system prompt, a system message folded into the first user
turn, tool results and the generation prompt itself are in P, so never learned; that includes an
empty reasoning block the generation prompt writes (Qwen3 with `enable_thinking=False`), while a
block the template writes only inside the turn is the model's output after P, so learned.
Templates that render a turn differently once later ones follow (Qwen3 gives a think block only
to replies after the last user turn; a template may put the system prompt only into a final user
turn) fail the checks, and the error names the turn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MASK_MODES", "ChatMaskError", "ChatMasker"]

MASK_MODES = ("auto", "generation_tags", "incremental")
# The same test transformers applies before it honours return_assistant_tokens_mask.
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_CONTEXT_CHARS = 30  # characters quoted on each side of a point where two renderings differ
# Options the masker sets itself on each apply_chat_template call.
_RESERVED_KWARGS = frozenset(
    {
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "return_dict",
        "return_assistant_tokens_mask",
    }
)

Messages = Sequence[Mapping[str, str]]


class ChatMaskError(ValueError):
    """The template cannot give this conversation a mask; the message names the turn."""


@dataclass(frozen=True)
class ChatMasker:
    """Tokenises conversations with a tokenizer's chat template and masks the assistant turns.

    Build it once per dataset with `ChatMasker.create`; `tokenize(messages)` gives the token ids
    of the whole rendering and a 0/1 mask over them.
    """

    tokenizer: Any
    mode: str  # "generation_tags" or "incremental", never "auto"
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    special_tokens: re.Pattern[str] | None = None  # any one special token's text

    def __post_init__(self) -> None:
        assert self.mode in MASK_MODES[1:], f"mode must be resolved, got {self.mode!r}"

    @classmethod
    def create(
        cls,
        tokenizer: Any,
        mask_mode: str = "auto",
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> ChatMasker:
        """Resolve `mask_mode` for this tokenizer ("auto": tags when the template has them)."""
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={mask_mode!r}; must be one of {MASK_MODES}")
        clashes = sorted(_RESERVED_KWARGS.intersection(template_kwargs or {}))
        if clashes:
            raise ValueError(
                f"chat_template_kwargs sets {clashes}, which the masking sets itself; expected "
                "only variables for the template (enable_thinking=False, say)"
            )
        try:
            template = tokenizer.get_chat_template()
        except ValueError as error:
            raise ValueError(f"the tokenizer has no chat template ({error})") from None
        has_tags = _GENERATION_TAG.search(template) is not None
        if mask_mode == "generation_tags" and not has_tags:
            raise ValueError(
                "mask_mode='generation_tags' but the chat template has no {% generation %} block; "
                "expected one around each assistant reply (or mask_mode='auto')"
            )
        mode = mask_mode
        if mode == "auto":
            mode = "generation_tags" if has_tags else "incremental"
        if mode == "incremental" and not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"mask_mode={mode!r} needs a fast tokenizer (for character offsets); got "
                f"{type(tokenizer).__name__}"
            )
        return cls(tokenizer, mode, dict(template_kwargs or {}), _special_token_pattern(tokenizer))

    def tokenize(self, messages: Messages) -> tuple[list[int], list[int]]:
        """(input ids, loss mask) of the whole conversation; `ChatMaskError` if undetermined."""
        if self.mode == "generation_tags":
            encoded = self._call_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return list(encoded["input_ids"]), list(encoded["assistant_masks"])
        whole = self._render(messages, generation_prompt=False)
        # Tokenised once, as a whole: tokenising the prompt and the reply apart could split or
        # merge tokens at their boundary differently from the sequence actually trained on.
        encoded = self.tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        mask = [0] * len(ids)
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = self._turn_span(messages, index, whole)
                for token in _tokens_overlapping(offsets, start, end):
                    mask[token] = 1
        return ids, mask

    def _turn_span(self, messages: Messages, index: int, whole: str) -> tuple[int, int]:
        """Characters [start, end) of `whole` that assistant message `index` must generate."""
        if index == 0:
            raise ChatMaskError(
                "messages[0] is an assistant reply with nothing before it, so the template gives "
                "it no prompt; expected a user (or system) message first, or a chat template with "
                "{% generation %} blocks"
            )
        prompt = self._render(messages[:index], generation_prompt=True)
        turn = (
            whole
            if index == len(messages) - 1
            else self._render(messages[: index + 1], generation_prompt=False)
        )
        if not turn.startswith(prompt):
            raise ChatMaskError(
                f"messages[{index}] (assistant): the template's generation prompt is not how it "
                f"begins this turn: messages[:{index}] rendered with add_generation_prompt=True "
                f"and messages[:{index + 1}] rendered {_difference(prompt, turn)}; expected the "
                "first to be a prefix of the second (or a template with {% generation %} blocks)"
            )
        end = len(prompt) + self._end_of_turn(turn[len(prompt) :], messages[index]["content"])
        if not whole.startswith(turn[:end]):
            raise ChatMaskError(
                f"messages[{index}] (assistant): the template renders this turn differently once "
                f"later messages follow: messages[:{index + 1}] rendered and the whole "
                f"conversation rendered {_difference(turn[:end], whole)}; expected the same text "
                "through the turn's end-of-turn token. Templates that give only replies after the "
                "last user turn a think block (Qwen3), or put the system prompt only into a final "
                "user turn, do this: split the conversation into one record per assistant turn, "
                "or use a chat template with {% generation %} blocks"
            )
        return len(prompt), end

    def _end_of_turn(self, turn: str, content: str) -> int:
        """Length of `turn` through the first special token after the reply text in it."""
        reply = content.strip()  # templates often trim the reply (Llama 3, Gemma, Mistral)
        found = turn.find(reply) if reply else -1
        # A reply the template rewrote (reasoning split out, say) is not found verbatim; then the
        # search starts at the turn's start, which is right unless the reply holds special tokens.
        after = found + len(reply) if found >= 0 else 0
        match = self.special_tokens.search(turn, after) if self.special_tokens else None
        return match.end() if match else len(turn)

    def _render(self, messages: Messages, *, generation_prompt: bool) -> str:
        text = self._call_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert isinstance(text, str), f"a rendering must be text, got {type(text).__name__}"
        return text

    def _call_template(self, messages: Messages, **options: Any) -> Any:
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(
                list(messages), **options, **self.template_kwargs
            )
        except jinja2.TemplateError as error:
            roles = ", ".join(m["role"] for m in messages)
            raise ChatMaskError(
                f"the chat template refused the conversation ({roles}): {error}"
            ) from None


def _special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching any special token's text, the longest first where two share a start."""
    texts = set(getattr(tokenizer, "all_special_tokens", ()))
    added = getattr(tokenizer, "added_tokens_decoder", {})
    texts.update(token.content for token in added.values() if getattr(token, "special", False))
    texts.discard("")
    if not texts:
        return None
    return re.compile("|".join(re.escape(text) for text in sorted(texts, key=len, reverse=True)))


def _tokens_overlapping(offsets: Sequence[Sequence[int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose characters overlap [start, end).

    A token straddling `start` (a merge of the prompt's last characters and the reply's first)
    is in, as with `{% generation %}` masks. A zero-width token is whitespace whose offsets the
    tokenizer trimmed (GPT-2's does: a lone space at c gets (c + 1, c + 1)), so it counts as the
    character before its offset.
    """
    tokens = []
    for index, (a, b) in enumerate(offsets):
        lo, hi = (a, b) if b > a else (a - 1, a)
        if lo < end and hi > start:
            tokens.append(index)
    return tokens


def _difference(first: str, second: str) -> str:
    """Where two renderings part, with a little text of each around that point."""
    at = next(
        (i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b),
        min(len(first), len(second)),
    )
    lo, hi = max(0, at - _CONTEXT_CHARS), at + _CONTEXT_CHARS
    return f"part at character {at} ({first[lo:hi]!r} against {second[lo:hi]!r})"
