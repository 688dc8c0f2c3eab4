"""train_tokenizer (byte-level round trip, special tokens, cache, vocabulary errors) and pack_dataset (EOS
separators, exact blocks, multi-process, the causal-LM collator)."""

from __future__ import annotations

import itertools
import logging

import datasets
import pytest
import torch
from datasets import Dataset, DatasetDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from hf_effitrain.data import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    corpus_stats,
    load_corpus,
    minimum_vocab_size,
    pack_dataset,
    train_tokenizer,
)
from hf_effitrain.data.encoding import encode_texts

VOCAB = 600


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("effi_cache")


@pytest.fixture(autouse=True)
def _private_cache(cache_dir, tmp_path, monkeypatch):
    """Never touch the user's caches: ours and datasets' both go to temporary directories."""
    monkeypatch.setenv("HF_EFFITRAIN_CACHE", str(cache_dir))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


@pytest.fixture(scope="module")
def corpus(cache_dir):
    return load_corpus(scope="stdlib", max_files=30, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def tokenizer(corpus, cache_dir):
    return train_tokenizer(corpus, VOCAB, cache_dir=cache_dir)


def test_tokenizer_special_tokens_and_size(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(ids) == 3 and max(ids) < len(tokenizer) <= VOCAB
    assert len(tokenizer) > minimum_vocab_size()  # merges were learned
    assert tokenizer.model_max_length == 2048
    # no automatic BOS / EOS: packing adds the separators itself
    assert tokenizer("x = 1")["input_ids"] == tokenizer.encode("x = 1", add_special_tokens=False)
    # code indentation compresses: a method body line costs a few tokens, not one per space
    assert len(tokenizer.encode("        return self\n")) <= 6


def test_round_trip_on_real_source(tokenizer, corpus):
    for text in [*corpus["validation"]["text"], *corpus["test"]["text"], *list(corpus["train"]["text"])[:5]]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=0, max_size=200) | st.text(alphabet=" \t\n\r\f\\\"'#:()[]{}=.,abcdef_0123456789é€😀"))
def test_round_trip_on_arbitrary_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_cache_hit_and_reload_through_auto_tokenizer(corpus, cache_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="hf_effitrain.data.tokenizer"):
        first = train_tokenizer(corpus, 300, cache_dir=cache_dir)
        assert "loading cached tokenizer" not in caplog.text
        second = train_tokenizer(corpus, 300, cache_dir=cache_dir)
        assert "loading cached tokenizer" in caplog.text
    assert second.get_vocab() == first.get_vocab() and second.eos_token == EOS_TOKEN
    assert len(list((cache_dir / "tokenizers").glob("bpe-300-*"))) == 1
    first.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "def f(x):\n    return x ** 2  # ok\n"
    assert reloaded.encode(text) == first.encode(text) and reloaded.pad_token_id == first.pad_token_id


def test_different_texts_train_different_tokenizers(cache_dir):
    a = train_tokenizer(["aaaa bbbb " * 50], 270, cache_dir=cache_dir)
    b = train_tokenizer(["cccc dddd " * 50], 270, cache_dir=cache_dir)
    assert a.get_vocab() != b.get_vocab()


def test_tokenizer_bad_input(corpus):
    with pytest.raises(ValueError, match=f"the minimum is {minimum_vocab_size()}"):
        train_tokenizer(corpus, minimum_vocab_size() - 1)
    with pytest.raises(ValueError, match="no text column 'content'"):
        train_tokenizer(corpus, 512, text_column="content")
    with pytest.raises(TypeError, match="iterable of strings"):
        train_tokenizer("just one string", 512)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(["", "  "], 512)


def test_max_train_chars_trains_on_a_sample(corpus, cache_dir, caplog):
    with caplog.at_level(logging.INFO, logger="hf_effitrain.data.tokenizer"):
        train_tokenizer(corpus, 300, max_train_chars=20_000, cache_dir=cache_dir, use_cache=False)
    line = next(r.getMessage() for r in caplog.records if "training a byte-level BPE" in r.getMessage())
    used_chars = int(line.split(", ")[-1].split()[0])
    longest = max(len(t) for t in corpus["train"]["text"])
    assert 20_000 <= used_chars < 20_000 + longest


def _expected_stream(tokenizer, texts):
    return list(
        itertools.chain.from_iterable(
            tokenizer.encode(t, split_special_tokens=True) + [tokenizer.eos_token_id] for t in texts
        )
    )


def test_pack_dataset_blocks(tokenizer):
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(40)] + ["", "print('é€😀')\n"]
    packed = pack_dataset(Dataset.from_dict({"text": texts, "other": list(range(42))}), tokenizer, block_size=16)
    assert packed.column_names == ["input_ids"]
    stream = _expected_stream(tokenizer, texts)
    assert len(packed) == len(stream) // 16 > 0
    assert all(len(row) == 16 for row in packed["input_ids"])
    # the blocks are the EOS-separated stream in order, the remainder shorter than a block dropped
    assert list(itertools.chain.from_iterable(list(packed["input_ids"]))) == stream[: len(packed) * 16]
    assert sum(row.count(tokenizer.eos_token_id) for row in packed["input_ids"]) == stream[: len(packed) * 16].count(
        tokenizer.eos_token_id
    )


def test_special_token_text_inside_a_document_is_not_a_separator(tokenizer):
    texts = [f's{i} = "{EOS_TOKEN}{BOS_TOKEN}"\n' for i in range(40)]
    documents = encode_texts(tokenizer, texts)
    assert all(tokenizer.eos_token_id not in ids and tokenizer.bos_token_id not in ids for ids in documents)
    assert [tokenizer.decode(ids) for ids in documents] == texts
    packed = pack_dataset(Dataset.from_dict({"text": texts}), tokenizer, block_size=8)
    stream = list(itertools.chain.from_iterable(list(packed["input_ids"])))
    assert (
        stream
        == list(itertools.chain.from_iterable(ids + [tokenizer.eos_token_id] for ids in documents))[: len(stream)]
    )


def test_pack_dataset_dict_multiprocess_and_collator(tokenizer, corpus):
    packed = pack_dataset(corpus, tokenizer, block_size=64, num_proc=2)
    assert isinstance(packed, DatasetDict) and set(packed) == {"train", "validation", "test"}
    single = pack_dataset(corpus["validation"], tokenizer, block_size=64)
    assert list(packed["validation"]["input_ids"]) == list(single["input_ids"])
    assert len(packed["train"]) == sum(len(_expected_stream(tokenizer, [t])) for t in corpus["train"]["text"]) // 64
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    batch = collator([packed["train"][i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 64) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])  # no padding in packed blocks, so nothing masked
    # token counts of corpus_stats agree with packing (one EOS per document on top)
    tokens = corpus_stats(corpus["validation"], tokenizer)["total"]["tokens"]
    assert tokens + len(corpus["validation"]) == len(_expected_stream(tokenizer, list(corpus["validation"]["text"])))


def test_pack_cache_is_reused_by_an_equal_tokenizer(corpus, tokenizer, cache_dir, tmp_path):
    """A tokenizer reloaded from disk (as in a new run or another rank) finds the blocks the first one cached."""
    first = pack_dataset(corpus["test"], tokenizer, block_size=32)
    tokenizer.save_pretrained(tmp_path / "tok")
    again = pack_dataset(corpus["test"], AutoTokenizer.from_pretrained(tmp_path / "tok"), block_size=32)
    assert first.cache_files and again.cache_files == first.cache_files
    other = pack_dataset(corpus["test"], train_tokenizer(corpus, 280, cache_dir=cache_dir), block_size=32)
    assert other.cache_files != first.cache_files


def test_pack_dataset_bad_input(tokenizer):
    data = Dataset.from_dict({"text": ["a b c"]})
    with pytest.raises(ValueError, match="block_size must be an integer >= 2, got 1"):
        pack_dataset(data, tokenizer, 1)
    with pytest.raises(ValueError, match="its columns are \\['text'\\]|the dataset's columns are \\['text'\\]"):
        pack_dataset(data, tokenizer, 8, text_column="content")
    with pytest.raises(TypeError, match="datasets.Dataset or DatasetDict"):
        pack_dataset(["a b c"], tokenizer, 8)

    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="eos_token"):
        pack_dataset(data, NoEos(), 8)
