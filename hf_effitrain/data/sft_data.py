"""`build_code_sft_dataset`: a code SFT set in trl's prompt-completion format, docstring -> function body.

Every function or method that opens with a docstring gives one row: the prompt is its `def` line(s) and docstring,
the completion the rest of its body, both cut from the file's own text (comments and formatting kept) and dedented
to the function's level. Rows come from `load_corpus`, so they inherit its split by file: a function whose file is
held out of pre-training is held out here too, and a model pre-trained on the train split never saw a validation or
test completion.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sys
import warnings

from datasets import DatasetDict, Features, Value

from .corpus import SPLITS, load_corpus

__all__ = ["build_code_sft_dataset", "extract_docstring_functions"]

logger = logging.getLogger(__name__)

# ast numbers lines by "\n", "\r\n" and "\r" only; str.splitlines would also break at form feeds and other
# separators that the stdlib has inside lines, and shift every line number after them
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")
_COLUMNS = ("prompt", "completion", "path", "name", "error")
_FEATURES = Features({column: Value("string") for column in _COLUMNS})


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def _dedent(lines: list[str], indent: str) -> str | None:
    """Remove `indent` from every line; None when a non-blank line does not start with it (text would change)."""
    out = []
    for line in lines:
        if line.startswith(indent):
            out.append(line[len(indent) :])
        elif not line.strip():
            out.append(line.lstrip(" \t"))
        else:
            return None
    return "".join(out)


class _FunctionCollector(ast.NodeVisitor):
    def __init__(self, lines: list[str]):
        self.lines = lines
        self.scope: list[str] = []
        self.rows: list[dict] = []

    def _visit_scope(self, node: ast.AST) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_ClassDef = _visit_scope

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._collect(node)
        self._visit_scope(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def _collect(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        body = node.body
        # a docstring followed by at least one statement that starts on a later line (`"doc"; return x` has no
        # line of its own to complete)
        if len(body) < 2 or not _is_docstring(body[0]) or body[1].lineno <= body[0].end_lineno:
            return
        def_line = self.lines[node.lineno - 1]
        indent = def_line[: len(def_line) - len(def_line.lstrip(" \t"))]
        prompt = _dedent(self.lines[node.lineno - 1 : body[0].end_lineno], indent)
        completion = _dedent(self.lines[body[0].end_lineno : node.end_lineno], indent)
        if prompt is None or completion is None:
            return
        if not completion.endswith(("\n", "\r")):
            completion += "\n"
        # The prompt ends at the closing quotes and the docstring line's line end opens the completion: a
        # byte-level BPE merges a newline with the indentation after it, so a prompt ending in a bare newline would
        # not tokenize as a prefix of prompt + completion (trl then moves the boundary itself, and inference
        # prompts would end in a token that training never put there).
        ending = prompt[len(prompt.rstrip("\r\n")) :]
        prompt, completion = prompt[: len(prompt) - len(ending)], ending + completion
        self.rows.append({"prompt": prompt, "completion": completion, "name": ".".join([*self.scope, node.name])})


def extract_docstring_functions(source: str) -> list[dict]:
    """`{"prompt", "completion", "name"}` for every function of `source` that has a docstring and a body after it.

    `name` is the qualified name (`Class.method`, `outer.inner`). Raises `SyntaxError` / `ValueError` when
    `source` does not parse.
    """
    with warnings.catch_warnings():
        # invalid escape sequences etc. in third-party files: not our business here
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    collector = _FunctionCollector(_LINE.findall(source))
    collector.visit(tree)
    return collector.rows


def _extract_batch(batch: dict, min_completion_chars: int, max_prompt_chars: int, max_completion_chars: int) -> dict:
    out: dict[str, list[str]] = {column: [] for column in _COLUMNS}

    def add(prompt: str, completion: str, path: str, name: str, error: str = "") -> None:
        for column, value in zip(out, (prompt, completion, path, name, error)):
            out[column].append(value)

    for text, path in zip(batch["text"], batch["path"]):
        try:
            rows = extract_docstring_functions(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
            add("", "", path, "", type(error).__name__)  # counted, then filtered out
            continue
        for row in rows:
            if len(row["prompt"]) <= max_prompt_chars and (
                min_completion_chars <= len(row["completion"]) <= max_completion_chars
            ):
                add(row["prompt"], row["completion"], path, row["name"])
    return out


def build_code_sft_dataset(
    source: str | os.PathLike = "python",
    *,
    scope: str = "stdlib",
    max_files: int | None = None,
    min_completion_chars: int = 32,
    max_prompt_chars: int = 1024,
    max_completion_chars: int = 2048,
    validation_fraction: float = 0.01,
    test_fraction: float = 0.01,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    **corpus_kwargs,
) -> DatasetDict:
    """Docstring -> body SFT rows (`prompt`, `completion`, plus `path` and `name`) from a Python source corpus.

    Args:
        source, scope, max_files, validation_fraction, test_fraction, cache_dir, **corpus_kwargs:
            Passed to `load_corpus`. Use the same values as for pre-training so that the splits agree file by file.
        min_completion_chars (`int`, *optional*, defaults to 32): skip trivial bodies (`return self._x`, `pass`).
        max_prompt_chars (`int`, *optional*, defaults to 1024): skip functions with longer signature + docstring.
        max_completion_chars (`int`, *optional*, defaults to 2048): skip longer bodies (about 600 BPE tokens).
        num_proc (`int`, *optional*): processes for the `datasets.map` that parses the files.

    Returns:
        `DatasetDict` with `train`, `validation`, `test`; `prompt` is the `def` line(s) and docstring, `completion`
        the rest of the body ending with a newline, both dedented to the function's level. Files that do not parse
        (Python 2 code, test fixtures) are skipped and counted in one log line. trl's `SFTTrainer` takes the rows
        as they are (the `path` / `name` columns are dropped by the Trainer as unused).
    """
    if min_completion_chars < 1 or max_prompt_chars < 1 or max_completion_chars < min_completion_chars:
        raise ValueError(
            f"need 1 <= min_completion_chars <= max_completion_chars and max_prompt_chars >= 1, got "
            f"min_completion_chars={min_completion_chars}, max_completion_chars={max_completion_chars}, "
            f"max_prompt_chars={max_prompt_chars}"
        )
    corpus = load_corpus(
        source,
        scope=scope,
        max_files=max_files,
        validation_fraction=validation_fraction,
        test_fraction=test_fraction,
        cache_dir=cache_dir,
        **corpus_kwargs,
    )
    if "path" not in corpus["train"].column_names:
        # a `datasets` dataset has no file key: number its rows so that `path` still says where a row came from
        corpus = DatasetDict(
            {s: d.map(lambda _, i: {"path": f"{s}#{i}"}, with_indices=True) for s, d in corpus.items()}
        )
    limits = {
        "min_completion_chars": min_completion_chars,
        "max_prompt_chars": max_prompt_chars,
        "max_completion_chars": max_completion_chars,
    }
    out, errors = {}, 0
    for split in SPLITS:
        dataset = corpus[split]
        extracted = dataset.map(
            _extract_batch,
            batched=True,
            batch_size=64,
            remove_columns=dataset.column_names,
            fn_kwargs=limits,
            # explicit, or a split where no function passes the filters would come back without columns
            features=_FEATURES,
            num_proc=num_proc if num_proc and len(dataset) >= num_proc > 1 else None,
            desc=f"Extracting functions ({split})",
        )
        errors += sum(1 for error in extracted["error"] if error)
        out[split] = extracted.filter(lambda error: not error, input_columns="error").remove_columns("error")
    if errors:
        version = "%d.%d" % sys.version_info[:2]
        logger.warning("code SFT dataset: skipped %d files that do not parse as Python %s", errors, version)
    logger.info("code SFT dataset: %s", ", ".join(f"{split} {len(out[split])} functions" for split in SPLITS))
    return DatasetDict(out)
