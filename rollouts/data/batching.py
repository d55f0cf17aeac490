"""Turn an `SFTDataset` into backend batches: a seeded epoch order, padding or packing, shifting.

The backend batch format (see `rollouts.training.backends.protocol`) wants labels aligned with the
logits, so the shift happens here: for an example of tokens x[0..n), the inputs are x[0..n-1) and
labels[t] = x[t+1], kept only where the token x[t+1] carries loss weight (-100 elsewhere). SFT
weights are 0 or 1, so the labels carry them whole; `with_loss_mask=True` adds them as a float
`loss_mask` [B, T] too. It is off by default because it changes nothing but the speed: without it
the cross-entropy takes its fused path (about 2% of a step on the tiny benchmark model).

Padding (`collate_padded`): one example per row, right-padded to the longest row of the
micro-batch; `attention_mask` is added only when a row is padded (an all-ones mask would only
cost the attention kernel its fast causal path).

Packing (`collate_packed`): consecutive examples of the epoch order share a row of
`row_length` positions. Each example's `position_ids` restart at 0 and no `attention_mask` is
passed: Hugging Face models (transformers >= 5, e.g. Llama) then derive a block-diagonal causal
mask from the position restarts, so packed examples do NOT attend to each other and their logits
equal those of the examples run alone. transformers does this only when the forward runs without
a KV cache (`use_cache=False`; with a cache it silently falls back to one causal mask over the
whole row), which is how the backends run every forward of a Hugging Face model. A model that
does not derive the mask from `position_ids` would let packed examples see each other: use
padding for such models.

The epoch order is a permutation drawn from `(seed, epoch)` alone, so the same seed gives the same
batches, and a run can resume mid-epoch from (epoch, micro-batch index) with nothing else saved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rollouts.data.sft import SFTDataset, TokenizedExample

IGNORE_INDEX = -100  # as rollouts.training.losses; not imported, so data never imports training

__all__ = ["collate_packed", "collate_padded", "collate_plan", "epoch_order", "plan_micro_batches"]

# A micro-batch plan: rows, each the indices of the examples that fill it (one when padding).
MicroBatchPlan = list[list[int]]


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The example indices of one epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return list(range(num_examples))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def plan_micro_batches(
    dataset: SFTDataset,
    order: Sequence[int],
    micro_batch_size: int,
    packing: bool = False,
) -> list[MicroBatchPlan]:
    """Group an epoch order into micro-batches of `micro_batch_size` rows (the last may be short).

    With packing, each row takes consecutive examples while their input positions fit
    `dataset.max_length - 1` (an example of n tokens uses n - 1 input positions).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size}; must be >= 1")
    rows: list[list[int]] = [[index] for index in order]
    if packing:
        rows = _pack_rows(dataset.examples, order, dataset.max_length - 1)
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


def _pack_rows(
    examples: Sequence[TokenizedExample], order: Sequence[int], row_length: int
) -> list[list[int]]:
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        need = len(examples[index].input_ids) - 1
        assert need <= row_length, "examples were truncated to max_length on loading"
        if current and used + need > row_length:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += need
    if current:
        rows.append(current)
    return rows


def _shifted(example: TokenizedExample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [n], labels [n], weights [n]) of one example; labels aligned with the inputs."""
    ids = torch.tensor(example.input_ids, dtype=torch.long)
    weights = torch.tensor(example.loss_mask[1:], dtype=torch.float32)
    labels = ids[1:].masked_fill(weights == 0, IGNORE_INDEX)
    return ids[:-1], labels, weights


def collate_padded(
    examples: Sequence[TokenizedExample], pad_token_id: int, with_loss_mask: bool = False
) -> dict[str, torch.Tensor]:
    """One example per row, right-padded; see the module docstring."""
    assert examples, "a micro-batch needs at least one example"
    shifted = [_shifted(example) for example in examples]
    length_T = max(len(inputs) for inputs, _, _ in shifted)
    batch_B = len(shifted)
    input_ids = torch.full((batch_B, length_T), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_B, length_T), IGNORE_INDEX, dtype=torch.long)
    loss_mask = torch.zeros((batch_B, length_T), dtype=torch.float32)
    lengths = []
    for row, (inputs, row_labels, weights) in enumerate(shifted):
        n = len(inputs)
        input_ids[row, :n] = inputs
        labels[row, :n] = row_labels
        loss_mask[row, :n] = weights
        lengths.append(n)
    batch = {"input_ids": input_ids, "labels": labels}
    if with_loss_mask:
        batch["loss_mask"] = loss_mask
    if min(lengths) < length_T:
        positions_T = torch.arange(length_T)
        batch["attention_mask"] = (positions_T < torch.tensor(lengths)[:, None]).long()
    return batch


def collate_packed(
    rows: Sequence[Sequence[TokenizedExample]],
    pad_token_id: int,
    row_length: int,
    with_loss_mask: bool = False,
) -> dict[str, torch.Tensor]:
    """Several examples per row with restarting `position_ids`; see the module docstring."""
    assert rows and all(rows), "a packed micro-batch needs non-empty rows"
    batch_B = len(rows)
    input_ids = torch.full((batch_B, row_length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_B, row_length), IGNORE_INDEX, dtype=torch.long)
    loss_mask = torch.zeros((batch_B, row_length), dtype=torch.float32)
    position_ids = torch.zeros((batch_B, row_length), dtype=torch.long)
    for row, row_examples in enumerate(rows):
        start = 0
        for example in row_examples:
            inputs, row_labels, weights = _shifted(example)
            end = start + len(inputs)
            assert end <= row_length, "rows were planned to fit row_length"
            input_ids[row, start:end] = inputs
            labels[row, start:end] = row_labels
            loss_mask[row, start:end] = weights
            position_ids[row, start:end] = torch.arange(end - start)
            start = end
        # The padded tail is its own "sequence" (positions restart), masked out of the loss.
        position_ids[row, start:] = torch.arange(row_length - start)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if with_loss_mask:
        batch["loss_mask"] = loss_mask
    return batch


def collate_plan(
    dataset: SFTDataset, plan: MicroBatchPlan, packing: bool
) -> dict[str, torch.Tensor]:
    """The batch of one micro-batch plan."""
    if packing:
        rows = [[dataset.examples[i] for i in row] for row in plan]
        return collate_packed(rows, dataset.pad_token_id, dataset.max_length - 1)
    return collate_padded([dataset.examples[row[0]] for row in plan], dataset.pad_token_id)
