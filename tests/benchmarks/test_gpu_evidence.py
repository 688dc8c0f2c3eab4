"""`scripts/gpu_evidence.py`, the one command for the GPU figures, keeps working without a GPU.

Its `--dry-run` runs each part as the GPU run does (the benchmark script as a subprocess, with every GPU-size flag
going through the script's own parser) and then the micro overrides that `test_benchmark_scripts.py` uses, on CPU;
so a renamed or removed flag, a changed output name or an unreadable result breaks CI instead of a GPU run. The
time limit and the split into commands are checked directly. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testing_utils import repo_root


def load_gpu_evidence():
    spec = importlib.util.spec_from_file_location("gpu_evidence", repo_root() / "scripts" / "gpu_evidence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


GPU_EVIDENCE = load_gpu_evidence()


@pytest.mark.parametrize("part", list(GPU_EVIDENCE.PARTS))
def test_dry_run_part(tmp_path, part):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(repo_root() / "scripts" / "gpu_evidence.py"),
            "--dry-run",
            "--part",
            part,
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=repo_root(),
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "gpu_evidence.json").read_text())
    row = summary["parts"][part]
    assert row["status"] == "ok"
    spec = GPU_EVIDENCE.PARTS[part]
    gpu_args = " ".join(a for a in spec.gpu_args if a not in spec.gpu_only)
    assert f"{gpu_args} {' '.join(spec.dry_args)}" in row["command"]  # GPU flags parsed first, micro values win
    result = json.loads(Path(row["result_json"]).read_text())
    assert result  # the script's own JSON, read back for the summary line
    assert not row["key_results"].startswith("result unreadable"), row["key_results"]
    assert f"{part}_dry.png" in {Path(png).name for png in row["pngs"]}
    for png in row["pngs"]:
        assert Path(png).stat().st_size > 1000, png
    assert (tmp_path / "gpu_evidence.png").stat().st_size > 1000
    assert row["estimate_s"] > 0 and row["estimate_flops"] > 0
    assert summary["environment"]["versions"]["torch"]
    assert summary["environment"]["source_digest"]


@pytest.mark.parametrize("part", list(GPU_EVIDENCE.PARTS))
def test_dry_args_replace_every_gpu_value(part):
    """A GPU value left in the dry run would run at GPU size (e.g. the whole `all` corpus scope) on CPU."""
    spec = GPU_EVIDENCE.PARTS[part]
    args = spec.gpu_args
    valued = [
        flag for flag, value in zip(args, args[1:] + ["--"]) if flag.startswith("--") and not value.startswith("--")
    ]
    switches = [
        flag for flag, value in zip(args, args[1:] + ["--"]) if flag.startswith("--") and value.startswith("--")
    ]
    assert valued
    assert [flag for flag in valued if flag not in spec.dry_args] == []
    assert [flag for flag in switches if flag not in spec.gpu_only] == []  # a switch cannot be undone by a later flag


@pytest.mark.parametrize("part", list(GPU_EVIDENCE.PARTS))
def test_parts_use_the_shared_spelling(part):
    """Multi-word options are dashed (`--max-files`): the scripts keep the underscore spelling only as an alias."""
    spec = GPU_EVIDENCE.PARTS[part]
    flags = [a for a in spec.gpu_args + spec.dry_args if a.startswith("--")]
    assert [flag for flag in flags if "_" in flag] == []
    assert "--size" in spec.gpu_args and "--size" in spec.dry_args
    assert GPU_EVIDENCE.part_command(spec, Path("stem"), True, None)[-2:] == ["--output", "stem"]


def test_run_limited_stops_an_overrunning_command(tmp_path):
    # the command starts a child of its own: stopping the part must stop its whole process group
    child = "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])"
    sleeper = [sys.executable, "-c", f"import subprocess, sys, time; {child}; time.sleep(120)"]
    status, seconds, returncode = GPU_EVIDENCE.run_limited(sleeper, 2, tmp_path / "sleep.log")
    assert (status, returncode) == ("timeout", None)
    assert seconds < 60
    failing = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    status, _, returncode = GPU_EVIDENCE.run_limited(failing, 60, tmp_path / "fail.log")
    assert (status, returncode) == ("failed", 3)
    assert "boom" in (tmp_path / "fail.log").read_text()


@pytest.mark.parametrize(
    "part, name",
    [
        ("kernels", "kernels_cpu_small"),
        ("patch", "patch_cpu_small"),
        ("ode", "ode_cpu_small_steps"),
        ("decode", "decode_cpu_mini"),
        ("cascade", "cascade_cpu_small"),
        ("msn", "msn_noise_cpu_mini"),
    ],
)
def test_key_results_read_recorded_results(part, name):
    """The summary line is read from results written before the shared run record, too."""
    result = json.loads((repo_root() / "scripts" / "results" / f"{name}.json").read_text())
    line = GPU_EVIDENCE.key_results(part, result)
    assert line and "unreadable" not in line


def test_split_into_commands():
    estimates = {
        name: GPU_EVIDENCE.Estimate(seconds=s, flops=1.0)
        for name, s in {"kernels": 100, "patch": 200, "ode": 200, "decode": 500, "cascade": 700}.items()
    }
    groups = GPU_EVIDENCE.split_into_commands(list(estimates), estimates, 540)
    assert groups == [["kernels", "patch", "ode"], ["decode"], ["cascade"]]
    assert GPU_EVIDENCE.split_into_commands(["kernels", "patch"], estimates, 540) == [["kernels", "patch"]]


def test_part_names_are_checked():
    with pytest.raises(SystemExit):
        GPU_EVIDENCE.parse_args(["--part", "kernels,decoder"])
    assert GPU_EVIDENCE.parse_args(["--part", "decode,kernels"]).names == ["kernels", "decode"]
