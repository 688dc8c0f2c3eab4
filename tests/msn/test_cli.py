"""`effitrain sft` on a CPU machine: bf16 default, empty validation split, export-dir and checkpoint-folder checks."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset, DatasetDict

import hf_effitrain.data
from hf_effitrain import NoisySFTConfig
from hf_effitrain.cli import main as cli_main
from hf_effitrain.methods.msn.job import SftArguments, load_sft_splits
from tests.msn.test_training import _prompt_completion, _tokenizer
from tests.testing_utils import tiny_model

_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only defaults")


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "base"
    tiny_model("llama").save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@_NO_GPU
def test_sft_config_bf16_defaults_off_on_cpu_and_explicit_bf16_keeps_the_error(tmp_path):
    assert NoisySFTConfig(output_dir=str(tmp_path)).bf16 is False
    assert NoisySFTConfig(output_dir=str(tmp_path), bf16=False).bf16 is False
    with pytest.raises(ValueError, match="bf16"):
        NoisySFTConfig(output_dir=str(tmp_path), bf16=True)


def test_sft_config_bf16_default_is_off_with_use_cpu_even_on_a_bf16_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert NoisySFTConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is False


def test_sft_cli_python_dataset_with_empty_validation_trains_without_bf16_flag(
    tmp_path, model_dir, monkeypatch, capsys
):
    data = _prompt_completion(16)
    empty = Dataset.from_dict({"prompt": [], "completion": []})
    monkeypatch.setattr(
        hf_effitrain.data,
        "build_code_sft_dataset",
        lambda *a, **k: DatasetDict(train=data, validation=empty, test=empty),
    )
    train, validation = load_sft_splits(SftArguments(model=str(model_dir)))
    assert len(train) == 16 and validation is None
    export = tmp_path / "export"
    export.mkdir()
    (export / "old.txt").write_text("previous export")
    argv = [
        "sft",
        "--model",
        str(model_dir),
        "--dataset",
        "python",
        "--max_files",
        "30",
        "--output_dir",
        str(tmp_path / "run"),
        "--export_dir",
        str(export),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--use_cpu",
        "true",
        "--gradient_checkpointing",
        "false",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--max_length",
        "64",
    ]
    with pytest.raises(ValueError, match="Export directory .* not empty.*--overwrite_export"):
        cli_main(argv)  # refused while parsing, before any training
    assert not (tmp_path / "run").exists()
    assert cli_main([*argv, "--overwrite_export", "true"]) == 0  # no --bf16: the CPU default works
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n") :])
    assert summary["global_step"] == 1 and "eval_loss" not in summary["metrics"]
    assert (export / "model.safetensors").is_file()


def test_sft_cli_refuses_bad_model_folders(tmp_path):
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text("{}")
    (binonly / "pytorch_model.bin").write_bytes(b"pickle")
    common = ["--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none"]
    with pytest.raises(ValueError, match="--model: .*'nope' does not exist"):
        cli_main(["sft", "--model", "nope", *common])
    with pytest.raises(ValueError, match="--model: .*pickled weights.*pytorch_model.bin"):
        cli_main(["sft", "--model", str(binonly), *common])
