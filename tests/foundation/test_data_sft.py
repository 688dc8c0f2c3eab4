"""build_code_sft_dataset: exact docstring -> body rows from known source, skipped functions / files, and the split
by file shared with load_corpus."""

from __future__ import annotations

import logging
import sysconfig

import datasets
import pytest

from hf_effitrain.data import SPLITS, build_code_sft_dataset, extract_docstring_functions, load_corpus

SOURCE = '''import os


@decorator(1)
def add(a: int,
        b: int) -> int:
    """Add two numbers.

    Long description.
    """
    total = a + b  # comment kept
    return total


class Greeter:
    """Class docstrings are not functions."""

    async def greet(self, name):
        """Say hello."""
        message = f"hello {name}"

        return message

    def tiny(self):
        """Too short a body."""
        return 1

    def no_docstring(self):
        value = 1
        return value


def only_docstring():
    """Nothing after me."""


def same_line():
    """Doc."""; return "a statement on the docstring's line"


def outer(items):
    """Outer function."""
    def inner(item):
        """Inner function."""
        return item * 2 + len(items)
    return [inner(i) for i in items]
'''

EXPECTED = {  # prompts end at the closing quotes; the line end opens the completion (BPE merges it with the indent)
    "add": (
        'def add(a: int,\n        b: int) -> int:\n    """Add two numbers.\n\n    Long description.\n    """',
        "\n    total = a + b  # comment kept\n    return total\n",
    ),
    "Greeter.greet": (
        'async def greet(self, name):\n    """Say hello."""',
        '\n    message = f"hello {name}"\n\n    return message\n',
    ),
    "outer": (
        'def outer(items):\n    """Outer function."""',
        '\n    def inner(item):\n        """Inner function."""\n        return item * 2 + len(items)\n'
        "    return [inner(i) for i in items]\n",
    ),
    "outer.inner": (
        'def inner(item):\n    """Inner function."""',
        "\n    return item * 2 + len(items)\n",
    ),
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EFFITRAIN_CACHE", str(tmp_path / "effi_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def test_extract_exact_prompt_and_completion():
    rows = {row["name"]: row for row in extract_docstring_functions(SOURCE)}
    # Greeter.tiny is extracted here and only dropped by the size filter of build_code_sft_dataset
    assert set(rows) == {*EXPECTED, "Greeter.tiny"}
    for name, (prompt, completion) in EXPECTED.items():
        assert (rows[name]["prompt"], rows[name]["completion"]) == (prompt, completion), name


def test_prompt_tokens_are_a_prefix_of_the_whole_row():
    """What trl checks before it masks the prompt: with our byte-level BPE the boundary falls between tokens."""
    from hf_effitrain.data import train_tokenizer

    tokenizer = train_tokenizer([SOURCE * 20], vocab_size=400, use_cache=False)
    for prompt, completion in EXPECTED.values():
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert tokenizer(prompt + completion)["input_ids"][: len(prompt_ids)] == prompt_ids, prompt


def test_extract_keeps_line_endings_and_form_feeds():
    source = 'def f():\r\n    """Doc."""\r\n    x = "\x0c"  # form feed inside a line\r\n    return x'
    (row,) = extract_docstring_functions(source)
    assert row["prompt"] == 'def f():\r\n    """Doc."""'
    assert row["completion"] == '\r\n    x = "\x0c"  # form feed inside a line\r\n    return x\n'


@pytest.fixture
def source_tree(tmp_path, monkeypatch):
    """A fake stdlib of 40 modules with known functions, one copy of SOURCE and one file that does not parse."""
    stdlib = tmp_path / "stdlib"
    (stdlib / "pkg").mkdir(parents=True)
    for i in range(40):
        body = f'def func_{i}(x):\n    """Return x plus {i}."""\n    result = x + {i}\n    return result * 1\n'
        (stdlib / f"mod_{i:02d}.py").write_text(body)
    (stdlib / "pkg" / "known.py").write_text(SOURCE)
    (stdlib / "pkg" / "broken.py").write_text("def broken(:\n    pass\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(stdlib)})
    return stdlib


def test_build_code_sft_dataset_rows_and_split_by_file(source_tree, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_effitrain.data.sft_data"):
        sft = build_code_sft_dataset(scope="stdlib", validation_fraction=0.2, test_fraction=0.2)
    assert "skipped 1 files that do not parse" in caplog.text
    assert set(sft) == set(SPLITS)
    assert sft["train"].column_names == ["prompt", "completion", "path", "name"]
    rows = [row for split in SPLITS for row in sft[split]]
    known = {row["name"]: (row["prompt"], row["completion"]) for row in rows if row["path"] == "stdlib/pkg/known.py"}
    assert known == EXPECTED  # Greeter.tiny (13 characters of body) is below min_completion_chars
    assert len(rows) == 40 + len(EXPECTED)
    # split by file, exactly like the pre-training corpus built with the same arguments
    corpus = load_corpus(scope="stdlib", validation_fraction=0.2, test_fraction=0.2)
    corpus_split = {path: split for split in SPLITS for path in corpus[split]["path"]}
    for split in SPLITS:
        assert all(corpus_split[path] == split for path in sft[split]["path"])
        assert len(sft[split]) > 0


def test_build_code_sft_dataset_limits(source_tree):
    limited = build_code_sft_dataset(scope="stdlib", max_files=5)
    assert len({path for split in SPLITS for path in limited[split]["path"]}) <= 5
    strict = build_code_sft_dataset(scope="stdlib", max_prompt_chars=40, validation_fraction=0.2, test_fraction=0.2)
    assert all(len(p) <= 40 for split in SPLITS for p in strict[split]["prompt"])
    with pytest.raises(ValueError, match="min_completion_chars <= max_completion_chars"):
        build_code_sft_dataset(scope="stdlib", min_completion_chars=100, max_completion_chars=10)


def test_real_stdlib_functions_round_trip_into_their_files():
    sft = build_code_sft_dataset(scope="stdlib", max_files=15)
    rows = [row for split in SPLITS for row in sft[split]]
    assert rows, "15 stdlib files hold no documented function"
    corpus = load_corpus(scope="stdlib", max_files=15)
    texts = {path: text for split in SPLITS for path, text in zip(corpus[split]["path"], corpus[split]["text"])}
    for row in rows:
        assert row["completion"].endswith("\n") and row["prompt"].lstrip().startswith(("def ", "async def "))
        first_line = row["prompt"].splitlines()[0]
        assert first_line in texts[row["path"]]
