"""Data layer: corpora, tokenizer, packing and a code SFT set.

- `load_corpus`: the interpreter's own Python source (stdlib / site-packages / both), local text, Python or JSON(L)
  files, or a `datasets` dataset, as train / validation / test split by a hash of each file's relative path.
- `corpus_stats` / `format_corpus_stats`: documents, characters and tokens per split.
- `train_tokenizer`: a cached byte-level BPE with `<|bos|>`, `<|endoftext|>`, `<|pad|>`.
- `pack_dataset`: EOS-separated documents cut into blocks of exactly `block_size` tokens.
- `build_code_sft_dataset`: docstring -> body prompt-completion rows, split by file like the corpus.
"""

from .corpus import SPLITS, load_corpus, split_of
from .packing import pack_dataset
from .sft_data import build_code_sft_dataset, extract_docstring_functions
from .stats import corpus_stats, format_corpus_stats
from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, load_tokenizer, minimum_vocab_size, train_tokenizer

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPLITS",
    "build_code_sft_dataset",
    "corpus_stats",
    "extract_docstring_functions",
    "format_corpus_stats",
    "load_corpus",
    "minimum_vocab_size",
    "pack_dataset",
    "split_of",
    "load_tokenizer",
    "train_tokenizer",
]
