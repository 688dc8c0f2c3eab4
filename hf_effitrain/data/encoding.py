"""`encode_texts`: token ids of many documents, through the Rust tokenizer's fastest batch path when that is exact."""

from __future__ import annotations

__all__ = ["encode_texts"]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` without special tokens, equal to `tokenizer(texts, add_special_tokens=False)`.

    A fast tokenizer whose backend has no truncation or padding configured is called through
    `Tokenizer.encode_batch_fast`, which skips the character offsets that `__call__` computes and that packing never
    uses (measured 1.7x faster on stdlib files). Any other tokenizer goes through `__call__`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast") and backend.truncation is None and backend.padding is None:
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return encoded["input_ids"]
