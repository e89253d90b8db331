"""Tokenizing prompts as diffusers does: pad to a fixed length, truncate with one warning line."""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("pipeline")


def tokenize(tokenizer: Any, prompts: list[str], max_length: int, *, warn: bool = True) -> torch.Tensor:
    """Token ids (batch x max_length, int64), padded; a prompt longer than the encoder takes is truncated,
    with one warning line saying how many tokens were dropped (`warn=False` where another encoder of the
    same family reads the whole text)."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    if warn:
        dropped = dropped_tokens(tokenizer, prompts, max_length)
        if any(dropped):
            what = "the prompt" if len(prompts) == 1 else f"{sum(1 for n in dropped if n)} prompts"
            logger.warning(
                "%s went past the %d tokens the text encoder reads: %s token(s) dropped",
                what,
                max_length,
                f"{max(dropped):,}" if len(prompts) == 1 else f"up to {max(dropped):,}",
            )
    return ids.to(torch.int64)


def dropped_tokens(tokenizer: Any, prompts: list[str], max_length: int) -> list[int]:
    """How many tokens of each prompt fall beyond `max_length` (special tokens included, as the encoder
    counts them)."""
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False).input_ids
    return [max(0, len(ids) - max_length) for ids in full]
