"""Architecture sweep: every causal-LM model type of the installed transformers, tiny and random, in float32.

For each type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` it builds a tiny model (`tests/sweep/tiny_configs.py`) and checks
(`tests/sweep/sweep_checks.py`): greedy Jacobi and TR-Jacobi against greedy `generate`, the export round trip
(`export_pretrained` reloads through the remote class and compares weights, buffers and logits) and the K=1 patch
loss against the model's own causal-LM loss. Writes the outcomes with versions, date, command and commit to JSON, and
prints the README table (`--table`).

    python scripts/sweep_architectures.py --output scripts/results/architecture_sweep.json
    python scripts/sweep_architectures.py --table scripts/results/architecture_sweep.json
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import warnings
from pathlib import Path

from bench_common import add_common_arguments, option_names, run_record

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "sweep"))

COLUMNS = (("jacobi", "Jacobi"), ("tr_jacobi", "TR-Jacobi"), ("export", "export"), ("patch_loss", "patch loss K=1"))
_MARKS = {"exact": "exact", "refused": "refused", "WRONG": "**WRONG**", "crash": "crash"}


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def run_sweep(model_types: list[str], timeout_s: int) -> list[dict]:
    from sweep_checks import check_type

    results = []
    signal.signal(signal.SIGALRM, _on_alarm)
    for model_type in model_types:
        start = time.time()
        signal.alarm(timeout_s)
        try:
            result = check_type(model_type)
        except _Timeout:
            result = {"model_type": model_type, "build": f"timeout: over {timeout_s} s"}
        finally:
            signal.alarm(0)
        result["seconds"] = round(time.time() - start, 1)
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


# substring of a refusal -> the short reason the README table shows
REASONS = (
    ("keeps recurrent state", "recurrent state"),
    ("keeps no KV cache", "no KV cache"),
    ("own cache class", "own cache class"),
    ("cannot be cropped back", "cache layers not croppable"),
    ("cannot roll back cache layers", "cache layers not croppable"),
    ("own dict of per-layer states", "own cache dict"),
    ("is_decoder=False", "encoder config"),
    ("forward takes `attention_mask` and `position_ids`", "no position_ids"),
    ("sliding window", "sliding window"),
    ("use_cache=True", "use_cache=False default"),
    ("per-layer inputs", "per-layer inputs by token id"),
    ("hash-assigned experts", "hash routing by token id"),
    ("n-gram streams", "n-gram streams"),
    ("prepends prompt tokens", "own prompt inputs"),
    ("segment, position and prompt inputs", "own segment inputs"),
    ("causal=False", "bidirectional"),
)


def reason(outcome: str) -> str:
    """The short reason of a refusal (see `REASONS`), else the error's first words."""
    for needle, label in REASONS:
        if needle in outcome:
            return label
    return " ".join(outcome.split(":", 2)[-1].split()[:6])


def _cell(outcome: str | None) -> str:
    if outcome is None:
        return "-"
    kind = outcome.split(":", 1)[0]
    if kind == "refused":
        return f"refused: {reason(outcome)}"
    return _MARKS.get(kind, kind)


def table(payloads: list[dict]) -> str:
    """Markdown table: one row per model type built on some version, one column per feature; a cell names each
    version's outcome where the versions differ. Types without a tiny model on any version are listed after it."""
    versions = [payload["versions"]["transformers"] for payload in payloads]
    by_version = [{r["model_type"]: r for r in payload["results"]} for payload in payloads]
    types = sorted(set().union(*by_version))
    header = ["model type", "checked on"] + [title for _, title in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    not_built = []
    for model_type in types:
        built = [(v, r[model_type]) for v, r in zip(versions, by_version) if r.get(model_type, {}).get("build") == "ok"]
        if not built:
            not_built.append(model_type)
            continue
        cells = [f"`{model_type}`", ", ".join(v for v, _ in built)]
        for name, _ in COLUMNS:
            per_version = [(version, _cell(result.get(name))) for version, result in built]
            distinct = {cell for _, cell in per_version}
            cells.append(per_version[0][1] if len(distinct) == 1 else "; ".join(f"{v}: {c}" for v, c in per_version))
        lines.append("| " + " | ".join(cells) + " |")
    if not_built:
        lines.append("")
        lines.append("No tiny model built (not checked): " + ", ".join(f"`{t}`" for t in not_built) + ".")
    return "\n".join(lines)


def summary(results: list[dict]) -> dict:
    counts: dict[str, dict[str, int]] = {}
    for name, _ in COLUMNS:
        for result in results:
            if result.get("build") == "ok":
                kind = result[name].split(":", 1)[0]
                counts.setdefault(name, {}).setdefault(kind, 0)
                counts[name][kind] += 1
    counts["built"] = sum(r.get("build") == "ok" for r in results)
    counts["types"] = len(results)
    return counts


def _results_of(path: Path) -> tuple[dict | None, list[dict]]:
    """(payload, results) of a JSON written by this script, or (None, results) of its printed log."""
    text = path.read_text()
    if text.lstrip().startswith("{\n") or path.suffix == ".json":
        payload = json.loads(text)
        return payload, payload["results"]
    return None, [json.loads(line) for line in text.splitlines() if line.startswith('{"model_type"')]


def _differing_versions(a: dict, b: dict) -> list[str]:
    """Packages recorded in both version dicts with different versions (older runs recorded fewer packages)."""
    return sorted(name for name in a.keys() & b.keys() if a[name] != b[name])


def merge(paths: list[Path], out: Path) -> None:
    """One payload from several partial runs of the same code and versions (parallel slices, reruns of a few types)."""
    payload, by_type, commands = None, {}, []
    for path in paths:
        part, results = _results_of(path)
        if part is not None:
            if payload is not None and _differing_versions(part["versions"], payload["versions"]):
                raise ValueError(
                    f"{path} ran on {part['versions']}, not {payload['versions']}: merge one version at a time."
                )
            payload = payload or dict(part)
            commands.append(part["command"])
        by_type.update({result["model_type"]: result for result in results})
    if payload is None:
        raise ValueError("--merge needs at least one JSON file written by this script (for versions and date).")
    payload["results"] = [by_type[t] for t in sorted(by_type)]
    payload["summary"] = summary(payload["results"])
    payload["command"] = (
        f"python scripts/sweep_architectures.py --merge {' '.join(p.name for p in paths)} --output {out.as_posix()}"
    )
    payload["slice_commands"] = commands
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload["summary"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, output_aliases=("--out",), output_help="JSON file to write (default: print only)")
    parser.add_argument("--types", nargs="*", help="model types to check (default: all causal-LM types)")
    parser.add_argument(*option_names("timeout_s"), type=int, default=120, help="per-type time limit in seconds")
    parser.add_argument("--table", nargs="*", type=Path, help="print the README table of these JSON files and exit")
    parser.add_argument(
        "--merge",
        nargs="*",
        type=Path,
        help="combine the results of these JSON files / run logs (a later file wins per type) into --output and exit",
    )
    args = parser.parse_args(argv)
    args.output = None if args.output is None else Path(args.output)
    if args.table:
        print(table([json.loads(path.read_text()) for path in args.table]))
        return
    if args.merge:
        if args.output is None:
            parser.error("--merge needs --output (the JSON file to write)")
        merge(args.merge, args.output)
        return

    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    logging.getLogger("hf_effitrain").setLevel(logging.WARNING)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model_types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    results = run_sweep(model_types, args.timeout_s)
    record = run_record("cpu")
    payload = {
        **record,
        "uncommitted_changes": record["git_dirty"],  # the key of earlier results
        "settings": {"dtype": "float32", "attn_implementation": "eager", "new_tokens": 10, "vocab_size": 128},
        "summary": summary(results),
        "results": results,
    }
    print(json.dumps(payload["summary"]))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
