"""Every benchmark script under `scripts/` runs end to end at a micro size and writes its JSON and PNG.

The figures in the README come from these scripts at larger sizes (the GPU sizes are run only on a GPU). Here each
script runs as a user runs it (a subprocess, its own argument parser) with sizes cut down to seconds, so a change
that breaks a benchmark breaks CI, and the invariants that do not depend on size are checked: float32 decoding
strategies agree with greedy on every prompt, the patch-level run costs half the FLOPs, layer compute follows the
ODE steps, curves start at the small model and end at the large one, the fused loss matches the unfused one.
No timing is asserted.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testing_utils import repo_root


def run_script(name: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(repo_root() / "scripts" / name), *args], capture_output=True, text=True, timeout=600, cwd=repo_root(), env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def load_result(stem: Path, png_suffixes: tuple[str, ...] = ("",)) -> dict:
    for suffix in png_suffixes:
        png = stem.parent / f"{stem.name}{suffix}.png"
        assert png.stat().st_size > 1000, png
    return json.loads(stem.with_suffix(".json").read_text())


def test_bench_patch(tmp_path):
    out = tmp_path / "patch"
    run_script(
        "bench_patch.py", "--size", "cpu_small", "--preset", "tiny", "--max-files", "20", "--vocab-size", "300",
        "--block-size", "16", "--batch-size", "4", "--tokens", "2e4", "--evals", "2", "--max-eval-blocks", "8",
        "--device", "cpu", "--output", str(out.with_suffix(".json")),
    )
    result = load_result(out)
    assert set(result["runs"]) == {"token", "patch", "patch_positions", "token_half"}
    for name in ("patch", "patch_positions"):  # both batchings: half the FLOPs, all the tokens
        assert result["summary"][f"{name}_over_token_flops"] == pytest.approx(0.5, abs=0.01)
        patch = result["runs"][name]
        assert patch["optimizer_steps"] == patch["patch_steps"] + patch["token_steps"]
        assert patch["train_tokens"] == result["runs"]["token"]["train_tokens"]
    assert result["runs"]["patch"]["optimizer_steps"] == result["runs"]["token"]["optimizer_steps"]  # equal tokens per step
    assert all(math.isfinite(run["final_eval_loss"]) for run in result["runs"].values())


def test_bench_ode(tmp_path):
    out = tmp_path / "ode"
    run_script(
        "bench_ode.py", "--preset", "cpu-small", "--out", str(out), "--hidden-size", "32", "--num-heads", "4",
        "--intermediate-size", "64", "--depth", "4", "--vocab-size", "300", "--block-size", "16", "--batch-size", "4",
        "--train-steps", "3", "--warmup-steps", "1", "--max-files", "20", "--eval-blocks", "4", "--decode-prompts", "1",
        "--decode-prompt-tokens", "8", "--decode-new-tokens", "4",
    )
    result = load_result(out)
    assert {"plain", "random", "llama"} <= set(result["runs"])
    for point in result["runs"]["plain"]["eval"]:
        assert point["layer_evaluations_per_token"] == point["num_steps"]
        assert point["relative_layer_compute"] == pytest.approx(point["num_steps"] / 4)
        assert math.isfinite(point["validation_loss"])


def test_bench_kernels(tmp_path):
    out = tmp_path / "kernels"
    run_script("bench_kernels.py", "--preset", "cpu-small", "--out", str(out), "--repeats", "1", "--max-sizes", "1", "--skip-e2e")
    result = load_result(out)
    providers = {row["provider"]: row for row in result["rows"] if row["op"] == "linear_cross_entropy"}
    assert {"torch", "effi"} <= set(providers)
    assert providers["effi"]["max_abs_diff_vs_torch"] < 1e-4
    assert providers["effi"]["peak_mem_mb"] < providers["torch"]["peak_mem_mb"]  # measured bytes, not a timing


def test_bench_cascade(tmp_path):
    out = tmp_path / "cascade"
    run_script(
        "bench_cascade.py", "--size", "cpu_small", "--pretrain_steps", "3", "--finetune_steps", "2",
        "--presets", "standard,paper", "--exact_match_examples", "2", "--speculative_prompts", "1", "--output", str(out),
    )
    result = load_result(out, ("", "_sequence", "_exact_match", "_decoded"))
    for name in ("standard", "paper"):  # decoded curves: the chow sweep reaches both exact ends
        decoded = result["decoded"][name]
        shares = [point["small_share"] for point in decoded["curves"]["speculative_chow"]["points"]]
        assert min(shares) == 0.0 and max(shares) == 1.0 and decoded["speculative_decoding"]["equal_to_large_greedy"] == 1
    for name in ("standard", "paper"):
        curve = result["curves"]["token"][name]
        finetuned = result["results"]["finetune"][name]
        summary = result["summary"]["token"][name]
        assert curve["thresholds"][0] == -math.inf
        assert summary["small_quality"] == pytest.approx(finetuned["small_token_accuracy"])
        assert summary["large_quality"] == result["summary"]["token"]["standard"]["large_quality"]


def test_bench_decode(tmp_path):
    humaneval = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(humaneval, "wt") as handle:
        for i, prompt in enumerate(["def add(a, b):\n    ", "def is_even(n):\n    "]):
            handle.write(json.dumps({"task_id": f"HumanEval/{i}", "prompt": prompt}) + "\n")
    out = tmp_path / "decode"
    run_script(
        "bench_decode.py", "--size", "cpu_small", "--humaneval", str(humaneval), "--out", str(out), "--max_files", "30",
        "--vocab_size", "300", "--block_size", "32", "--pretrain_steps", "3", "--pretrain_batch", "4", "--sft_steps", "2",
        "--sft_batch", "2", "--humaneval_prompts", "2", "--corpus_prompts", "1", "--max_new_tokens", "8", "--repeats", "1",
        "--datastore_tokens", "20000",
    )
    result = load_result(out)
    assert result["num_prompts"] == {"humaneval": 2, "corpus": 1}
    for model in ("sft", "msn"):
        methods = result["decoding"][model]
        assert set(methods) == {"greedy", "static_greedy", "prompt_lookup", "jacobi", "tr_jacobi_msn", "tr_jacobi", "tr_jacobi_datastore"}
        for name, method in methods.items():
            assert method["agreement"] == 1.0, (model, name)  # float32: every strategy is exact
            assert all(p["new_tokens"] == 8 for p in method["per_prompt"])
            low, mean, high = method["tokens_per_forward_95"][1], method["tokens_per_forward_95"][0], method["tokens_per_forward_95"][2]
            assert low <= mean <= high and mean >= 1.0
        for name in ("greedy", "jacobi", "tr_jacobi_msn", "tr_jacobi", "tr_jacobi_datastore"):
            assert methods[name]["step_overhead_ratio"] > 0 and methods[name]["mean_tree_size"] >= 1
        assert methods["tr_jacobi_msn"]["mean_tree_size"] > methods["jacobi"]["mean_tree_size"]
    assert result["datastore"]["split"] == "train" and result["datastore"]["tokens"] > 0


def test_bench_data(tmp_path):
    out = tmp_path / "data.json"
    run_script(
        "bench_data.py", "--scopes", "stdlib", "--max-files", "20", "--vocab-size", "300", "--tokenizer-chars", "100000",
        "--sft-scopes", "stdlib", "--output", str(out),
    )
    result = load_result(out.with_suffix(""))
    stdlib = result["scopes"]["stdlib"]
    assert sum(stdlib["files"].values()) == 20
    assert stdlib["tokens"]["train"] > 0 and stdlib["characters"]["train"] > stdlib["tokens"]["train"]
