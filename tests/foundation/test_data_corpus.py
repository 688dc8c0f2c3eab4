"""load_corpus (Python scopes on a synthetic interpreter layout and on the real one, local files, `datasets`),
split determinism, de-duplication, max_files, the on-disk cache, corpus_stats and the bad-input errors."""

from __future__ import annotations

import json
import logging
import os
import site
import sysconfig

import datasets
import pytest

from hf_effitrain.data import SPLITS, corpus_stats, format_corpus_stats, load_corpus, split_of


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's caches: ours and datasets' both go to the test's temporary directory."""
    monkeypatch.setenv("HF_EFFITRAIN_CACHE", str(tmp_path / "effi_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _write(path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


def _rows(corpus) -> dict[str, str]:
    """path -> split of every document."""
    return {path: split for split in SPLITS for path in corpus[split]["path"]}


@pytest.fixture
def fake_interpreter(tmp_path, monkeypatch):
    """A stdlib folder (with a nested site-packages that must not count as stdlib) and a separate site-packages."""
    stdlib, site_dir = tmp_path / "lib" / "python3", tmp_path / "venv" / "site-packages"
    for i in range(30):
        _write(stdlib / f"mod_{i:02d}.py", f"def f{i}(x):\n    return x + {i}\n")
    _write(stdlib / "pkg" / "__init__.py", "")  # empty: dropped
    _write(stdlib / "pkg" / "copy_of_mod_00.py", "def f0(x):\n    return x + 0\n")  # duplicate content
    _write(stdlib / "pkg" / "latin1.py", "# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n".encode("latin-1"))
    _write(stdlib / "__pycache__" / "mod_00.py", "cached = True\n")
    _write(stdlib / ".hidden" / "secret.py", "hidden = True\n")
    _write(stdlib / "notes.txt", "not python\n")
    _write(stdlib / "site-packages" / "thirdparty.py", "third = 'party'\n")
    for i in range(10):
        _write(site_dir / "lib_a" / f"part_{i}.py", f"PART = {i}\n")
    paths = {"stdlib": str(stdlib), "purelib": str(site_dir), "platlib": str(site_dir)}
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: dict(paths))
    monkeypatch.setattr(site, "getsitepackages", lambda *a, **k: [str(site_dir)])
    return stdlib, site_dir


def test_python_scopes_select_dedup_and_skip_files(fake_interpreter, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_effitrain.data.corpus"):
        stdlib = load_corpus(scope="stdlib", validation_fraction=0.2, test_fraction=0.2)
    paths = set(_rows(stdlib))
    # 30 modules; of the two identical files the first in hash order survives; no empty, latin-1, cache, hidden,
    # non-.py or nested site-packages file
    assert len(paths) == 30
    assert paths <= {f"stdlib/mod_{i:02d}.py" for i in range(30)} | {"stdlib/pkg/copy_of_mod_00.py"}
    assert len(paths & {"stdlib/mod_00.py", "stdlib/pkg/copy_of_mod_00.py"}) == 1
    assert "skipped 1 not UTF-8 files" in caplog.text
    site_corpus = load_corpus(scope="site", validation_fraction=0.2, test_fraction=0.2)
    assert set(_rows(site_corpus)) == {f"site/lib_a/part_{i}.py" for i in range(10)}
    both = load_corpus(scope="all", validation_fraction=0.2, test_fraction=0.2)
    assert set(_rows(both)) == paths | set(_rows(site_corpus))
    assert stdlib["train"].column_names == ["text", "path"]


def test_split_is_a_function_of_the_relative_path_only(fake_interpreter, tmp_path, monkeypatch):
    kwargs = {"validation_fraction": 0.2, "test_fraction": 0.2, "use_cache": False}
    first = _rows(load_corpus(scope="stdlib", **kwargs))
    assert first == _rows(load_corpus(scope="stdlib", **kwargs))
    assert all(split == split_of(path, 0.2, 0.2) for path, split in first.items())
    assert {"train", "validation", "test"} == set(first.values())
    # the same files written elsewhere in the opposite order: same relative paths, same split
    stdlib, _ = fake_interpreter
    moved = tmp_path / "elsewhere" / "python3"
    for source in sorted(stdlib.rglob("mod_*.py"), reverse=True):
        _write(moved / source.relative_to(stdlib), source.read_text())
    _write(moved / "extra_module.py", "EXTRA = 1\n")  # a new file does not move the others
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(moved)})
    second = _rows(load_corpus(scope="stdlib", **kwargs))
    assert {p: s for p, s in second.items() if p in first} == {p: s for p, s in first.items() if p in second}
    assert len(set(first) & set(second)) >= 29


def test_max_files_is_a_deterministic_nested_subset(fake_interpreter):
    full = set(_rows(load_corpus(scope="stdlib", use_cache=False)))
    five = _rows(load_corpus(scope="stdlib", max_files=5, use_cache=False))
    ten = _rows(load_corpus(scope="stdlib", max_files=10, use_cache=False))
    assert len(five) == 5 and len(ten) == 10
    assert set(five) <= set(ten) <= full
    assert five == _rows(load_corpus(scope="stdlib", max_files=5, use_cache=False))
    # small corpora still get non-empty held-out splits
    assert all(list(five.values()).count(split) >= 1 for split in SPLITS)


def test_cache_hit_and_invalidation(fake_interpreter, tmp_path, caplog):
    stdlib, _ = fake_interpreter
    with caplog.at_level(logging.INFO, logger="hf_effitrain.data.corpus"):
        first = load_corpus(scope="stdlib")
        assert "loading cached corpus" not in caplog.text
        again = load_corpus(scope="stdlib")
        assert "loading cached corpus" in caplog.text
    assert list(again["train"]["text"]) == list(first["train"]["text"])
    assert list((tmp_path / "effi_cache" / "corpus").iterdir())  # under $HF_EFFITRAIN_CACHE
    _write(stdlib / "mod_03.py", "def changed():\n    return 'a new body'\n")
    os.utime(stdlib / "mod_03.py", ns=(1, 1))
    changed = load_corpus(scope="stdlib")
    texts = [t for split in SPLITS for t in changed[split]["text"]]
    assert "def changed():\n    return 'a new body'\n" in texts


def test_real_stdlib_subset():
    corpus = load_corpus(scope="stdlib", max_files=24)
    paths = _rows(corpus)
    assert len(paths) == 24 and all(p.startswith("stdlib/") and p.endswith(".py") for p in paths)
    assert not any("site-packages" in p or "dist-packages" in p for p in paths)
    assert all(len(corpus[split]) >= 1 for split in SPLITS)
    assert paths == _rows(load_corpus(scope="stdlib", max_files=24, use_cache=False))


def test_local_directory_of_txt_py_and_jsonl(tmp_path):
    root = tmp_path / "data"
    _write(root / "a.txt", "alpha text\n")
    _write(root / "sub" / "b.py", "print('b')\n")
    _write(root / "rows.jsonl", "\n".join(json.dumps({"content": f"row {i}", "id": i}) for i in range(6)) + "\n")
    _write(root / "ignored.csv", "x,y\n")
    corpus = load_corpus(str(root), text_column="content", validation_fraction=0.2, test_fraction=0.2)
    rows = _rows(corpus)
    assert set(rows) == {"a.txt", "sub/b.py", *(f"rows.jsonl#{i}" for i in range(6))}
    # every document sits where its key hashes, except at most one moved into each held-out split left empty
    assert sum(split != split_of(path, 0.2, 0.2) for path, split in rows.items()) <= 2
    texts = {t for split in SPLITS for t in corpus[split]["text"]}
    assert {"alpha text\n", "print('b')\n", "row 0", "row 5"} <= texts


def test_single_files_split_by_row(tmp_path):
    text_file = tmp_path / "book.txt"
    _write(text_file, "\n\n".join(f"paragraph {i}\nsecond line" for i in range(40)))
    corpus = load_corpus(text_file, validation_fraction=0.1, test_fraction=0.1)
    assert sum(len(corpus[s]) for s in SPLITS) == 40
    assert list(corpus["train"]["path"])[0].startswith("book.txt#")
    records = tmp_path / "records.json"
    _write(records, json.dumps([{"text": f"record {i}"} for i in range(20)] + [{"text": "record 0"}]))
    corpus = load_corpus(str(records), validation_fraction=0.2, test_fraction=0.2)
    assert sum(len(corpus[s]) for s in SPLITS) == 20  # the duplicate record is dropped


def test_windows_line_ends_and_byte_order_mark(tmp_path):
    text_file = tmp_path / "notes.txt"
    _write(text_file, "\ufeff" + "\r\n\r\n".join(f"paragraph {i}\r\nline" for i in range(20)))
    corpus = load_corpus(text_file, validation_fraction=0.0, test_fraction=0.0)
    texts = sorted(corpus["train"]["text"])
    assert len(texts) == 20
    assert all(not t.endswith("\r") and not t.startswith("\ufeff") for t in texts)


def test_datasets_builder_source_gets_missing_splits(tmp_path):
    data = tmp_path / "rows.jsonl"
    _write(data, "\n".join(json.dumps({"body": f"document number {i}"}) for i in range(200)))
    kwargs = {"data_files": str(data), "text_column": "body", "validation_fraction": 0.1, "test_fraction": 0.1}
    corpus = load_corpus("json", **kwargs)
    assert all(corpus[split].column_names == ["text"] for split in SPLITS)
    sizes = [len(corpus[split]) for split in SPLITS]
    assert sum(sizes) == 200 and all(size > 0 for size in sizes)
    assert list(corpus["validation"]["text"]) == list(load_corpus("json", **kwargs)["validation"]["text"])
    assert len(load_corpus("json", max_files=50, **kwargs)["train"]) < 50


def test_corpus_stats_counts(tmp_path):
    root = tmp_path / "d"
    _write(root / "a.txt", "héllo")
    _write(root / "b.txt", "wörld!")
    corpus = load_corpus(root, validation_fraction=0.0, test_fraction=0.0)
    stats = corpus_stats(corpus)
    assert stats["total"] == {"documents": 2, "characters": 11}
    assert stats["splits"]["train"] == {"documents": 2, "characters": 11}

    class CharTokenizer:  # any tokenizer-like callable: one token per character
        def __call__(self, texts, **kwargs):
            return {"input_ids": [[ord(c) for c in text] for text in texts]}

    assert corpus_stats(corpus, CharTokenizer())["total"]["tokens"] == 11
    assert format_corpus_stats(corpus_stats(corpus, CharTokenizer())).startswith("train 2 docs 11 chars 11 tokens")


@pytest.mark.parametrize(
    ("files", "call", "message"),
    [
        ({}, lambda tmp: load_corpus(scope="everything"), "choose one of stdlib, site, all"),
        ({}, lambda tmp: load_corpus(tmp / "missing_dir"), "does not exist"),
        ({}, lambda tmp: load_corpus("./missing.jsonl"), "does not exist"),
        ({"notes.csv": "a,b"}, lambda tmp: load_corpus(tmp), "holds no .txt, .py, .jsonl, .json files"),
        ({"empty.txt": "  \n\n"}, lambda tmp: load_corpus(tmp / "empty.txt"), "holds no text"),
        ({"rows.jsonl": '{"content": "x"}'}, lambda tmp: load_corpus(tmp / "rows.jsonl"), "columns are ['content']"),
        ({"bad.jsonl": '{"text": 1'}, lambda tmp: load_corpus(tmp / "bad.jsonl"), "bad.jsonl:1 is not valid JSON"),
        ({}, lambda tmp: load_corpus("no-such-org/no-such-dataset"), "'no-such-org/no-such-dataset'"),
        ({}, lambda tmp: load_corpus(validation_fraction=0.6, test_fraction=0.5), "must be < 1"),
        ({}, lambda tmp: load_corpus(validation_fraction=-0.1), "validation_fraction must be in [0, 1)"),
        ({}, lambda tmp: load_corpus(max_files=0), "max_files must be a positive integer"),
    ],
)
def test_bad_input_errors(tmp_path, files, call, message):
    data = tmp_path / "data"
    data.mkdir()
    for name, content in files.items():
        _write(data / name, content)
    with pytest.raises(ValueError) as error:
        call(data)
    assert message in str(error.value)


def test_unloadable_dataset_name_mentions_offline_cache():
    with pytest.raises(ValueError, match="loads only from the local datasets cache"):
        load_corpus("no-such-org/no-such-dataset")
