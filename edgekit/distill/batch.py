"""Batches of training sequences: right-padded tensors, shared by training, the logit cache and evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _pad(rows: list, value, width: int) -> torch.Tensor:
    import torch

    rows = [torch.as_tensor(r) for r in rows]
    out = torch.full((len(rows), width, *rows[0].shape[1:]), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def collate(items: list[dict], sparse_mode: str | None) -> dict:
    """Right-pad sequences (lists or tensors) into a batch; padded labels are -100, padded sparse targets
    are harmless zeros. Used for training, the logit cache and evaluation alike."""
    import torch

    width = max(len(x["input_ids"]) for x in items)
    batch = {
        "input_ids": _pad([x["input_ids"] for x in items], 0, width),
        "labels": _pad([x["labels"] for x in items], -100, width),
        "attention_mask": _pad([torch.ones(len(x["input_ids"]), dtype=torch.long) for x in items], 0, width),
    }
    if sparse_mode:
        batch["indices"] = _pad([x["indices"] for x in items], 0, width)
        batch["values"] = _pad([x["values"] for x in items], 0.0, width)
    return batch
