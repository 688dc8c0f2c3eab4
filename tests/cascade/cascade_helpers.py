"""Helpers of the cascade tests: small / large tiny pairs and a word-level tokenizer over the tiny vocabulary."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.testing_utils import TINY_VOCAB, tiny_model

SPECIALS = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
EOS_ID, PAD_ID = 2, 0


def large_overrides(architecture: str) -> dict:
    """Config fields that make the `tiny` preset twice as wide: the cascade's large member."""
    return {"n_embd": 64} if architecture == "gpt2" else {"hidden_size": 64, "intermediate_size": 128}


def tiny_pair(architecture: str = "llama", **overrides):
    """A float32 (small, large) pair over the same 128-token vocabulary, EOS id 2, pad id 0."""
    special = {"eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "bos_token_id": 1}
    small = tiny_model(architecture, seed=0, **special, **overrides)
    large = tiny_model(architecture, seed=1, **special, **large_overrides(architecture), **overrides)
    return small, large


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: `w3 w17 ...` -> ids 3, 17; ids 0-2 are pad / bos / eos."""
    vocab = {**SPECIALS, **{f"w{i}": i for i in range(3, TINY_VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def prompts(batch: int = 3, length: int = 7, seed: int = 5) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-padded random prompts (rows 0 and 1 padded) and their attention mask."""
    ids = torch.randint(3, TINY_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    if batch > 1:
        mask[1, :1] = 0
    return ids.masked_fill(mask == 0, PAD_ID), mask
