"""Size and build time of the default corpora on this machine: the Python `stdlib`, `site` and `all` scopes.

For each scope: files per split, characters, tokens under one byte-level BPE (vocab 8192) trained on a sample of
the `all` train split, the time of a cold build (every file listed, read, hashed, split; no cache) and of a cached
load, and the docstring -> body SFT rows that `build_code_sft_dataset` extracts. Token counts are cached by content
hash so that `all` (the union of the other two) is not tokenized twice. Writes JSON (device, date, command,
versions, git commit, every number) and a PNG next to it (`--output`, default `scripts/results/data_corpus_cpu.json`).

    OMP_NUM_THREADS=2 python scripts/bench_data.py                   # ~30 min on 2 busy shared CPU cores
    python scripts/bench_data.py --scopes stdlib --max-files 200     # quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import datasets
from bench_common import add_common_arguments, output_stem, run_record, with_suffix

from hf_effitrain.data import SPLITS, build_code_sft_dataset, load_corpus, train_tokenizer
from hf_effitrain.data.encoding import encode_texts

RESULTS = Path(__file__).parent / "results"


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _count_tokens(corpus, tokenizer, memo: dict[bytes, int]) -> dict[str, int]:
    """Tokens per split (no special tokens); documents already counted (same content) are looked up."""
    out = {}
    for split in SPLITS:
        total = 0
        for batch in corpus[split].iter(batch_size=256):
            keys = [hashlib.blake2b(text.encode(), digest_size=16).digest() for text in batch["text"]]
            todo = [i for i, key in enumerate(keys) if key not in memo]
            for i, ids in zip(todo, encode_texts(tokenizer, [batch["text"][i] for i in todo])):
                memo[keys[i]] = len(ids)
            total += sum(memo[key] for key in keys)
        out[split] = total
    return out


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = list(results["scopes"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    tokens = [sum(results["scopes"][s]["tokens"].values()) / 1e6 for s in scopes]
    chars = [sum(results["scopes"][s]["characters"].values()) / 1e6 for s in scopes]
    cold = [results["scopes"][s]["build_seconds_cold"] for s in scopes]
    cached = [results["scopes"][s]["load_seconds_cached"] for s in scopes]
    axes[0].bar(scopes, chars)
    axes[0].set_title("characters (M)")
    axes[1].bar(scopes, tokens, color="tab:orange")
    axes[1].set_title("BPE-8192 tokens (M)")
    x = range(len(scopes))
    axes[2].bar([i - 0.2 for i in x], cold, width=0.4, label="cold build")
    axes[2].bar([i + 0.2 for i in x], cached, width=0.4, label="cached load")
    axes[2].set_xticks(list(x), scopes)
    axes[2].set_title("seconds")
    axes[2].legend()
    fig.suptitle(f"hf_effitrain corpora on {results['device']} ({results['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scopes", nargs="+", default=["stdlib", "site", "all"])
    parser.add_argument("--max-files", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer-chars", type=int, default=20_000_000, help="BPE training sample (characters)")
    parser.add_argument(
        "--sft-scopes",
        nargs="*",
        default=["stdlib", "site"],
        help="scopes whose docstring -> body SFT rows are counted (parsing every file is the slowest step; `all` is "
        "about the sum of the other two)",
    )
    add_common_arguments(
        parser,
        default_output=str(RESULTS / "data_corpus_cpu.json"),
        output_help="JSON path (a PNG is written next to it)",
    )
    args = parser.parse_args(argv)
    cache = Path(tempfile.mkdtemp(prefix="bench_data_"))  # a fresh cache: the cached-load timing is honest
    try:
        return _run(args, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _run(args: argparse.Namespace, cache: Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    datasets.disable_progress_bars()
    results = {
        **run_record("cpu"),  # corpus building and tokenization run on the CPU only
        "args": vars(args),
        "scopes": {},
    }
    kwargs = {"max_files": args.max_files, "cache_dir": cache}
    tokenizer_scope = "all" if "all" in args.scopes else args.scopes[-1]
    corpora = {}
    for scope in args.scopes:
        _, cold = _timed(lambda: load_corpus(scope=scope, use_cache=False, max_files=args.max_files))
        _, first = _timed(lambda: load_corpus(scope=scope, **kwargs))  # build + save to the cache
        corpus, cached = _timed(lambda: load_corpus(scope=scope, **kwargs))
        corpora[scope] = corpus
        results["scopes"][scope] = {
            "files": {split: len(corpus[split]) for split in SPLITS},
            "characters": {split: sum(len(t) for t in corpus[split]["text"]) for split in SPLITS},
            "build_seconds_cold": round(cold, 2),
            "build_and_cache_seconds": round(first, 2),
            "load_seconds_cached": round(cached, 3),
        }
        logging.info("%s: %s", scope, results["scopes"][scope])
    tokenizer, train_s = _timed(
        lambda: train_tokenizer(
            corpora[tokenizer_scope], args.vocab_size, max_train_chars=args.tokenizer_chars, cache_dir=cache
        )
    )
    results["tokenizer"] = {
        "trained_on": f"{tokenizer_scope} train split, {args.tokenizer_chars} characters sampled",
        "vocab_size": len(tokenizer),
        "train_seconds": round(train_s, 1),
    }
    memo: dict[bytes, int] = {}
    for scope, corpus in corpora.items():
        tokens, seconds = _timed(lambda: _count_tokens(corpus, tokenizer, memo))
        entry = results["scopes"][scope]
        entry["tokens"] = tokens
        entry["tokenize_seconds"] = round(seconds, 1)
        entry["chars_per_token"] = round(sum(entry["characters"].values()) / max(1, sum(tokens.values())), 3)
        if scope in args.sft_scopes:
            sft, sft_s = _timed(lambda: build_code_sft_dataset(scope=scope, **kwargs))
            entry["sft_rows"] = {split: len(sft[split]) for split in SPLITS}
            entry["sft_seconds"] = round(sft_s, 1)
        logging.info("%s: %s", scope, entry)
    stem = output_stem(args.output)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with_suffix(stem, ".json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, with_suffix(stem, ".png"))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
