"""Every benchmark script under `scripts/` runs end to end at a micro size and writes its JSON and PNG.

The figures in the README come from these scripts at larger sizes (the GPU sizes are run only on a GPU). Here each
script runs as a user runs it (a subprocess, its own argument parser) with sizes cut down to seconds, so a change
that breaks a benchmark breaks CI, and the invariants that do not depend on size are checked: float32 decoding
strategies agree with greedy on every prompt, the patch-level run costs half the FLOPs, layer compute follows the
ODE steps, curves start at the small model and end at the large one, the fused loss matches the unfused one, and
every JSON carries the run record of `scripts/bench_common.py`. The scripts are called with the shared spelling
(`--size`, `--output`, dashed multi-word options). No timing is asserted.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testing_utils import repo_root


def run_script(name: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(repo_root() / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=repo_root(),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


RECORD_KEYS = {"device", "date", "command", "versions", "git_commit", "git_dirty", "source_digest"}


def load_result(stem: Path, png_suffixes: tuple[str, ...] = ("",)) -> dict:
    for suffix in png_suffixes:
        png = stem.parent / f"{stem.name}{suffix}.png"
        assert png.stat().st_size > 1000, png
    result = json.loads((stem.parent / f"{stem.name}.json").read_text())
    assert RECORD_KEYS <= set(result), RECORD_KEYS - set(result)
    assert {"python", "torch", "transformers"} <= set(result["versions"])
    return result


def test_bench_patch(tmp_path):
    out = tmp_path / "patch"
    run_script(
        "bench_patch.py",
        "--size",
        "cpu_small",
        "--preset",
        "tiny",
        "--max-files",
        "20",
        "--vocab-size",
        "300",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--tokens",
        "2e4",
        "--evals",
        "2",
        "--max-eval-blocks",
        "8",
        "--device",
        "cpu",
        "--output",
        str(out.with_suffix(".json")),  # the JSON path, as the README writes it
    )
    result = load_result(out)
    assert set(result["runs"]) == {"token", "patch", "patch_positions", "token_half"}
    for name in ("patch", "patch_positions"):  # both batchings: half the FLOPs, all the tokens
        assert result["summary"][f"{name}_over_token_flops"] == pytest.approx(0.5, abs=0.01)
        patch = result["runs"][name]
        assert patch["optimizer_steps"] == patch["patch_steps"] + patch["token_steps"]
        assert patch["train_tokens"] == result["runs"]["token"]["train_tokens"]
    assert (
        result["runs"]["patch"]["optimizer_steps"] == result["runs"]["token"]["optimizer_steps"]
    )  # equal tokens per step
    assert all(math.isfinite(run["final_eval_loss"]) for run in result["runs"].values())


def test_bench_ode(tmp_path):
    out = tmp_path / "ode"
    run_script(
        "bench_ode.py",
        "--size",
        "cpu-small",
        "--output",
        str(out),
        "--hidden-size",
        "32",
        "--num-heads",
        "4",
        "--intermediate-size",
        "64",
        "--depth",
        "4",
        "--vocab-size",
        "300",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--train-steps",
        "3",
        "--warmup-steps",
        "1",
        "--max-files",
        "20",
        "--eval-blocks",
        "4",
        "--decode-prompts",
        "1",
        "--decode-prompt-tokens",
        "8",
        "--decode-new-tokens",
        "4",
    )
    result = load_result(out)
    assert {"plain", "random", "llama"} <= set(result["runs"])
    for point in result["runs"]["plain"]["eval"]:
        assert point["layer_evaluations_per_token"] == point["num_steps"]
        assert point["relative_layer_compute"] == pytest.approx(point["num_steps"] / 4)
        assert math.isfinite(point["validation_loss"])


def test_bench_kernels(tmp_path):
    out = tmp_path / "kernels"
    run_script(
        "bench_kernels.py",
        "--size",
        "cpu-small",
        "--output",
        str(out),
        "--repeats",
        "1",
        "--max-sizes",
        "1",
        "--skip-e2e",
    )
    result = load_result(out)
    providers = {row["provider"]: row for row in result["rows"] if row["op"] == "linear_cross_entropy"}
    assert {"torch", "effi"} <= set(providers)
    assert providers["effi"]["max_abs_diff_vs_torch"] < 1e-4
    assert providers["effi"]["peak_mem_mb"] < providers["torch"]["peak_mem_mb"]  # measured bytes, not a timing


def test_bench_cascade(tmp_path):
    out = tmp_path / "cascade"
    run_script(
        "bench_cascade.py",
        "--size",
        "cpu_small",
        "--pretrain-steps",
        "3",
        "--finetune-steps",
        "2",
        "--presets",
        "standard,paper",
        "--exact-match-examples",
        "2",
        "--speculative-prompts",
        "1",
        "--output",
        str(out),
    )
    result = load_result(out, ("", "_sequence", "_exact_match", "_decoded"))
    assert result["git"] == {"commit": result["git_commit"], "dirty": result["git_dirty"]}  # the key of earlier results
    for name in ("standard", "paper"):  # decoded curves: the chow sweep reaches both exact ends
        decoded = result["decoded"][name]
        shares = [point["small_share"] for point in decoded["curves"]["speculative_chow"]["points"]]
        assert (
            min(shares) == 0.0 and max(shares) == 1.0 and decoded["speculative_decoding"]["equal_to_large_greedy"] == 1
        )
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
        "bench_decode.py",
        "--size",
        "cpu_small",
        "--humaneval",
        str(humaneval),
        "--output",
        str(out),
        "--max-files",
        "30",
        "--vocab-size",
        "300",
        "--block-size",
        "32",
        "--pretrain-steps",
        "3",
        "--pretrain-batch",
        "4",
        "--sft-steps",
        "2",
        "--sft-batch",
        "2",
        "--humaneval-prompts",
        "2",
        "--corpus-prompts",
        "1",
        "--max-new-tokens",
        "8",
        "--repeats",
        "1",
        "--datastore-tokens",
        "20000",
    )
    result = load_result(out)
    assert result["num_prompts"] == {"humaneval": 2, "corpus": 1}
    for model in ("sft", "msn"):
        methods = result["decoding"][model]
        assert set(methods) == {
            "greedy",
            "static_greedy",
            "prompt_lookup",
            "jacobi",
            "tr_jacobi_msn",
            "tr_jacobi_no_memory",
            "tr_jacobi",
            "tr_jacobi_datastore",
        }
        for name, method in methods.items():
            assert method["agreement"] == 1.0, (model, name)  # float32: every strategy is exact
            assert all(p["new_tokens"] == 8 for p in method["per_prompt"])
            low, mean, high = (
                method["tokens_per_forward_95"][1],
                method["tokens_per_forward_95"][0],
                method["tokens_per_forward_95"][2],
            )
            assert low <= mean <= high and mean >= 1.0
            # the forwards timed by hooks are a part of the call's wall-clock
            assert all(0 < p["forward_seconds"] <= p["seconds"] for p in method["per_prompt"]), (model, name)
            assert method["cost_over_own_forwards"] >= 1.0
        for name in ("greedy", "jacobi", "tr_jacobi_msn", "tr_jacobi_no_memory", "tr_jacobi", "tr_jacobi_datastore"):
            assert methods[name]["step_overhead_ratio"] > 0 and methods[name]["mean_tree_size"] >= 1
        # the memory learns greedy's output of each prompt after all methods ran on it: 3 prompts, 8 new tokens each
        assert methods["tr_jacobi"]["draft_memory_tokens_at_end"] == 3 * 8
        assert methods["tr_jacobi_msn"]["mean_tree_size"] > methods["jacobi"]["mean_tree_size"]
        mean, low, high = methods["greedy"]["text_retrieval_ceiling_95"]  # drafting from the text, with hindsight
        assert (
            low <= mean <= high
            and mean >= 1.0
            and methods["greedy"]["text_retrieval_ceiling_tokens_per_forward"] >= 1.0
        )
    assert result["datastore"]["split"] == "train" and result["datastore"]["tokens"] > 0


def test_bench_msn_noise(tmp_path):
    out = tmp_path / "msn_noise"
    run_script(
        "bench_msn_noise.py",
        "--size",
        "micro",
        "--output",
        str(out),
        "--sft-steps",
        "2",
        "--corpus-prompts",
        "2",
        "--max-new-tokens",
        "8",
        "--schedules",
        "L0,L3-uniform-half",
    )
    result = load_result(out)
    assert set(result["models"]) == {"L0", "L3-uniform-half"}
    noisy = result["models"]["L3-uniform-half"]
    assert (noisy["noise_length"], noisy["noise_kind"], noisy["noise_fraction"]) == (3, "uniform", 0.5)
    for model in result["models"].values():
        for name, strategy in model["decoding"].items():
            assert strategy["equal_to_greedy"] == strategy["prompts"] == result["num_prompts"] >= 1, (
                name
            )  # float32: exact
            mean, low, high = strategy["tokens_per_forward"]
            assert low <= mean <= high and mean >= 1.0, name  # a forward yields at least one token


def test_bench_data(tmp_path):
    out = tmp_path / "data.json"
    run_script(
        "bench_data.py",
        "--scopes",
        "stdlib",
        "--max-files",
        "20",
        "--vocab-size",
        "300",
        "--tokenizer-chars",
        "100000",
        "--sft-scopes",
        "stdlib",
        "--output",
        str(out),
    )
    result = load_result(out.with_suffix(""))
    stdlib = result["scopes"]["stdlib"]
    assert sum(stdlib["files"].values()) == 20
    assert stdlib["tokens"]["train"] > 0 and stdlib["characters"]["train"] > stdlib["tokens"]["train"]


def test_recorded_results_are_still_read(tmp_path):
    """The JSONs under scripts/results/ record earlier runs (older keys, old option spellings): the code paths that
    read them still do, called with the old spelling `--out`."""
    results = repo_root() / "scripts" / "results"
    for name in ("ode_cpu_small_steps_part1", "ode_cpu_small_steps_part2", "patch_cpu_small"):
        shutil.copy(results / f"{name}.json", tmp_path)
    parts = [str(tmp_path / f"ode_cpu_small_steps_part{i}.json") for i in (1, 2)]
    run_script("bench_ode.py", "--merge", *parts, "--out", str(tmp_path / "ode_merged"))
    merged = json.loads((tmp_path / "ode_merged.json").read_text())
    recorded = json.loads((results / "ode_cpu_small_steps.json").read_text())  # the same merge, run back then
    assert set(merged["runs"]) == set(recorded["runs"]) and merged["summary"] == recorded["summary"]
    assert (tmp_path / "ode_merged.png").stat().st_size > 1000
    run_script("bench_patch.py", "--replot", str(tmp_path / "patch_cpu_small.json"))
    assert (tmp_path / "patch_cpu_small.png").stat().st_size > 1000
