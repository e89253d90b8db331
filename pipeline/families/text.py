"""Tokenizing prompts as diffusers does: pad to a fixed length, truncate with a warning."""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("pipeline")


def tokenize(tokenizer: Any, prompts: list[str], max_length: int) -> torch.Tensor:
    """Token ids (batch x max_length, int64), padded; a prompt longer than the encoder takes is truncated
    with one warning naming what was dropped."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] >= ids.shape[-1] and not torch.equal(ids, full[:, : ids.shape[-1]]):
        removed = tokenizer.batch_decode(full[:, max_length - 1 : -1])
        logger.warning("prompt truncated to %d tokens; dropped: %s", max_length, removed)
    return ids.to(torch.int64)
