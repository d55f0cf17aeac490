"""Data for training: chat datasets for SFT, their batching, and a char-level tokenizer."""

from rollouts.data._chat_masks import MASK_MODES
from rollouts.data.batching import (
    collate_packed,
    collate_padded,
    collate_plan,
    epoch_order,
    plan_micro_batches,
)
from rollouts.data.char_tokenizer import build_char_tokenizer
from rollouts.data.prompts import ChatPrompt, read_chat_prompts
from rollouts.data.sft import (
    SFTDataError,
    SFTDataset,
    TokenizedExample,
    load_sft_dataset,
    tokenize_records,
)

__all__ = [
    "MASK_MODES",
    "ChatPrompt",
    "SFTDataError",
    "SFTDataset",
    "TokenizedExample",
    "build_char_tokenizer",
    "collate_packed",
    "collate_padded",
    "collate_plan",
    "epoch_order",
    "load_sft_dataset",
    "plan_micro_batches",
    "read_chat_prompts",
    "tokenize_records",
]
