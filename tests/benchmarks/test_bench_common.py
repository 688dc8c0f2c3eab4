"""`scripts/bench_common.py`: the options every benchmark script shares and the record every result JSON starts with.

The old spellings (`--out`, `--preset` for the benchmark size, `--max_files`) keep working as aliases, so command
lines recorded in earlier results and in the README still run; checked here on the parser helper and on the real
parsers of `bench_decode.py` and `bench_ode.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.testing_utils import repo_root

SCRIPTS = repo_root() / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the scripts import bench_common as a sibling

import bench_common  # noqa: E402


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def make_parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    bench_common.add_common_arguments(parser, **kwargs)
    parser.add_argument(*bench_common.option_names("max_files"), type=int)
    return parser


def test_new_and_old_spellings_parse_to_the_same_value():
    parser = make_parser(
        sizes=["cpu-small", "gpu"],
        default_size="cpu-small",
        default_output="results/x",
        size_aliases=("--preset",),
        output_aliases=("--out",),
        device_default="cpu",
    )
    new = parser.parse_args(["--size", "gpu", "--output", "a/b", "--max-files", "3", "--device", "cuda"])
    old = parser.parse_args(["--preset", "gpu", "--out", "a/b", "--max_files", "3", "--device", "cuda"])
    assert vars(new) == vars(old) == {"size": "gpu", "output": "a/b", "max_files": 3, "device": "cuda"}
    assert vars(parser.parse_args([])) == {
        "size": "cpu-small",
        "output": "results/x",
        "max_files": None,
        "device": "cpu",
    }
    assert parser.parse_args(["--size", "cpu_small"]).size == "cpu-small"  # `_` and `-` name the same size


def test_unknown_size_is_refused_with_the_allowed_ones(capsys):
    parser = make_parser(sizes=["cpu_small", "gpu"], default_size="cpu_small")
    with pytest.raises(SystemExit):
        parser.parse_args(["--size", "huge"])
    err = capsys.readouterr().err
    assert "'huge'" in err and "'cpu_small', 'gpu'" in err
    with pytest.raises(ValueError, match="'tiny' is not one of the sizes"):
        make_parser(sizes=["cpu_small", "gpu"], default_size="tiny")
    assert not hasattr(make_parser().parse_args([]), "size")  # a script with one size has no --size
    assert not hasattr(make_parser().parse_args([]), "device")


def test_option_names():
    assert bench_common.option_names("max_files") == ["--max-files", "--max_files"]
    assert bench_common.option_names("max-files") == ["--max-files", "--max_files"]
    assert bench_common.option_names("repeats", "--r") == ["--repeats", "--r"]


def test_output_stem_accepts_a_prefix_or_the_json_path():
    assert bench_common.output_stem("r/patch_cpu_long_4.8M.json") == bench_common.output_stem("r/patch_cpu_long_4.8M")
    assert bench_common.with_suffix(bench_common.output_stem("r/x_4.8M.json"), "_sequence.png") == Path(
        "r/x_4.8M_sequence.png"
    )


def test_run_record_has_the_fields():
    record = bench_common.run_record("cpu")
    assert record["device"].startswith("CPU (") and "threads" in record["device"]
    date = datetime.fromisoformat(record["date"])
    assert date.tzinfo is not None and abs(datetime.now(timezone.utc) - date) < timedelta(minutes=5)
    assert Path(sys.executable).name in record["command"]
    versions = record["versions"]
    assert {"python", "torch", "transformers"} <= set(versions)
    import torch
    import transformers

    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["transformers"] == transformers.__version__
    assert len(record["source_digest"]) == 64
    json.dumps(record)  # goes into the result JSON as is
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True)
    if head.returncode == 0:
        assert record["git_commit"] == head.stdout.strip() and isinstance(record["git_dirty"], bool)
    else:  # a copy of the tree without git metadata: says where the commit came from
        assert "commit_from" in record


def test_run_record_refuses_an_unknown_device():
    with pytest.raises(ValueError, match="'mps'"):
        bench_common.run_record("mps")


def test_script_parsers_keep_the_old_spellings():
    decode = load_script("bench_decode")
    new = decode.parse_args(
        [
            "--size",
            "cpu_small",
            "--output",
            "o",
            "--max-files",
            "30",
            "--noise-length",
            "3",
            "--work-dir",
            "w",
            "--stop-at-eos",
        ]
    )
    old = decode.parse_args(
        [
            "--size",
            "cpu_small",
            "--out",
            "o",
            "--max_files",
            "30",
            "--noise_length",
            "3",
            "--work_dir",
            "w",
            "--stop_at_eos",
        ]
    )
    assert vars(new) == vars(old)
    assert (new.output, new.max_files, new.noise_length, new.work_dir, new.stop_at_eos) == ("o", 30, 3, "w", True)

    ode = load_script("bench_ode")
    config_new, args_new = ode.parse_args(["--size", "gpu", "--output", "o"])
    config_old, args_old = ode.parse_args(["--preset", "gpu", "--out", "o"])
    assert config_new == config_old == ode.PRESETS["gpu"]
    assert (args_new.size, args_new.output) == (args_old.size, args_old.output) == ("gpu", "o")


def test_msn_noise_schedules_parse_and_bad_ones_are_refused(capsys):
    study = load_script("bench_msn_noise")
    args = study.parse_args(["--size", "micro", "--schedules", "L0,L8-uniform-half"])
    assert [(s.noise_length, s.noise_kind, s.noise_fraction) for s in args.schedule_list] == [
        (0, "ahead", 1.0),
        (8, "uniform", 0.5),
    ]
    for bad in ("L5-loud", "5", "Lx"):
        with pytest.raises(SystemExit):
            study.parse_args(["--size", "micro", "--schedules", bad])
        assert f"bad schedule {bad!r}: expected L<length> with optional -uniform / -half" in capsys.readouterr().err
    # without --pretrained every size pre-trains its own model, at its own block length and batch
    gpu = study.parse_args(["--size", "gpu", "--pretrain-steps", "1500"])
    assert (gpu.pretrained, gpu.pretrain_steps, gpu.pretrain_block_size, gpu.pretrain_batch) == (None, 1500, 512, 16)


def test_text_retrieval_ceiling_copies_the_best_earlier_continuation():
    ceiling = load_script("bench_decode").text_retrieval_ceiling
    # prompt 1 2 3 4, then greedy repeats it: one step copies 2 3 (the bonus is 4), after the prefill's 1
    assert ceiling([1, 2, 3, 4, 1, 2, 3, 4], start=4) == 2
    # nothing in the text recurs: one forward per new token
    assert ceiling([1, 2, 3, 4, 5, 6, 7, 8], start=4) == 4
    # the longest of two earlier continuations of the current token wins (5 6 7 after the second 9, not 5 8)
    assert ceiling([9, 5, 8, 9, 5, 6, 7, 0, 9, 5, 6, 7, 0], start=8) == 2
    # the text generated so far is searched too, but only what is already known can be copied: a run of 12 ones takes
    # the prefill, then 0, 1, 3 and 3 drafts (capped by the last token coming as a bonus); at most max_draft per step
    tokens = [7] + [1] * 12
    assert ceiling(tokens, start=1) == 5 and ceiling(tokens, start=1, max_draft=2) == 6
