"""Pre-training job: argument checks, presets, a tiny real run on the stdlib corpus, resume after interruption."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from hf_effitrain.methods.patch.job import (
    PretrainArguments,
    build_pretrain_model,
    parse_config_overrides,
    run_pretrain,
    training_arguments_class,
)
from hf_effitrain.models.presets import PRESETS, build_config, build_model
from hf_effitrain.training.resume import last_complete_checkpoint
from tests.testing_utils import ARCHITECTURES


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_presets_build_every_architecture(architecture):
    model = build_model("tiny", architecture, vocab_size=300, max_position_embeddings=64)
    assert model.config.model_type == architecture
    assert model.config.vocab_size == 300
    assert 10_000 < sum(p.numel() for p in model.parameters()) < 100_000


def test_preset_sizes_match_their_names():
    llama = lambda preset: sum(p.numel() for p in build_model(preset, "llama", vocab_size=8192).parameters())  # noqa: E731
    assert 0.4e6 < llama("tiny") < 0.7e6
    assert 25e6 < llama("small") < 35e6
    assert sorted(PRESETS) == ["base", "mini", "small", "tiny"]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"preset": "huge"}, "Unknown preset 'huge'"), ({"architecture": "t5"}, "Unknown architecture 't5'")],
)
def test_unknown_preset_or_architecture_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_config(**{"preset": "tiny", "architecture": "llama", **kwargs})
    with pytest.raises(ValueError, match=message):
        PretrainArguments(**kwargs)


def test_config_overrides_are_typed():
    assert parse_config_overrides("a=1, b=0.5,c=true,d=none,e=heun") == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": None,
        "e": "heun",
    }
    assert parse_config_overrides(None) == {}
    with pytest.raises(ValueError, match="Bad config override 'oops'"):
        parse_config_overrides("oops")


def test_block_size_larger_than_positions_is_refused(tmp_path):
    class FakeTokenizer:
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

        def __len__(self):
            return 100

    args = PretrainArguments(preset="tiny", block_size=2048, config_overrides="max_position_embeddings=512")
    with pytest.raises(ValueError, match="block_size 2048 is larger than the model's max_position_embeddings 512"):
        build_pretrain_model(args, FakeTokenizer())


class StopAfter(TrainerCallback):
    """Simulates a run killed after `step` optimizer steps (the exception escapes `train()` like a crash)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated kill at step {self.step}")


def _tiny_run(output_dir, resume=None) -> tuple[PretrainArguments, TrainingArguments]:
    args = PretrainArguments(
        preset="tiny", scope="stdlib", max_files=40, vocab_size=320, block_size=32, max_eval_blocks=8
    )
    training_args = training_arguments_class()(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_steps=2,
        logging_steps=1,
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        resume_from_checkpoint=resume,
    )
    return args, training_args


def test_tiny_pretrain_run_trains_evaluates_and_saves_safetensors(tmp_path):
    summary = run_pretrain(*_tiny_run(tmp_path / "run"))
    assert summary["global_step"] == 6
    assert summary["tokens_seen"] == 6 * 4 * 32
    assert summary["metrics"]["eval_loss"] > 0
    assert summary["metrics"]["eval_perplexity"] == pytest.approx(
        torch.tensor(summary["metrics"]["eval_loss"]).exp().item(), rel=1e-6
    )
    assert summary["corpus"]["splits"]["train"]["characters"] > 0
    assert summary["corpus"]["packed_tokens"]["train"] >= 6 * 4 * 32
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert not list((tmp_path / "run").glob("pytorch_model*.bin"))


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    reference = run_pretrain(*_tiny_run(tmp_path / "full"))
    interrupted_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(*_tiny_run(interrupted_dir), callbacks=(StopAfter(3),))
    assert (interrupted_dir / "checkpoint-2").is_dir() and not (interrupted_dir / "checkpoint-6").exists()
    resumed = run_pretrain(*_tiny_run(interrupted_dir, resume="latest"))
    assert resumed["global_step"] == reference["global_step"] == 6
    state = json.loads((interrupted_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    full = load_file(tmp_path / "full" / "model.safetensors")
    again = load_file(interrupted_dir / "model.safetensors")
    for name, tensor in full.items():
        torch.testing.assert_close(again[name], tensor, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_killed_while_saving_is_skipped_on_resume(tmp_path):
    reference = run_pretrain(*_tiny_run(tmp_path / "full"))
    run_dir = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(*_tiny_run(run_dir), callbacks=(StopAfter(5),))
    # the save of step 4 was cut short: its folder exists but lacks its state and optimizer files
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt"):
        (run_dir / "checkpoint-4" / name).unlink()
    assert last_complete_checkpoint(run_dir) == str(run_dir / "checkpoint-2")
    resumed = run_pretrain(*_tiny_run(run_dir, resume="latest"))
    assert resumed["global_step"] == reference["global_step"] == 6
    full, again = load_file(tmp_path / "full" / "model.safetensors"), load_file(run_dir / "model.safetensors")
    for name, tensor in full.items():
        torch.testing.assert_close(again[name], tensor, rtol=1e-4, atol=1e-5)


def test_non_empty_export_dir_is_refused_before_training(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="Export directory .* exists and is not empty; pass --overwrite_export"):
        PretrainArguments(preset="tiny", export_dir=str(export))
    assert PretrainArguments(preset="tiny", export_dir=str(export), overwrite_export=True).overwrite_export


def test_init_from_needs_safetensors_and_keeps_the_checkpoint_tokenizer(tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickled weights"):
        PretrainArguments(preset="tiny", init_from=str(pickled))

    first_args, first_training = _tiny_run(tmp_path / "first")
    first_args.export_dir = str(tmp_path / "first_export")
    first_training.max_steps = 2
    run_pretrain(first_args, first_training)
    # vocab_size left at its default (8192): the checkpoint's 320-token tokenizer must be used, not a new BPE
    args = PretrainArguments(
        preset="tiny", scope="stdlib", max_files=40, block_size=32, max_eval_blocks=8, init_from=first_args.export_dir
    )
    _, training = _tiny_run(tmp_path / "second")
    training.max_steps = 2
    summary = run_pretrain(args, training)
    assert summary["global_step"] == 2
    assert json.loads((tmp_path / "second" / "config.json").read_text())["vocab_size"] == 320


def test_seed_makes_the_run_reproducible(tmp_path):
    runs = []
    for name in ("a", "b"):
        args, training = _tiny_run(tmp_path / name)
        training.max_steps, training.save_strategy = 2, "no"
        run_pretrain(args, training)
        runs.append(load_file(tmp_path / name / "model.safetensors"))
    for key, tensor in runs[0].items():
        assert torch.equal(runs[1][key], tensor), key


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"hiden_size": 64},
            r"Unknown config field 'hiden_size' for architecture 'llama'; did you mean \['hidden_size'",
        ),
        ({"hidden_size": "abc"}, "Bad config value for llama: .*hidden_size.*expected int"),
    ],
)
def test_config_overrides_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config("tiny", "llama", **overrides)


def test_init_from_refuses_config_overrides(tmp_path):
    checkpoint = tmp_path / "ckpt"
    build_model("tiny", "llama", vocab_size=300).save_pretrained(checkpoint)
    with pytest.raises(
        ValueError, match="config_overrides 'num_hidden_layers=4' cannot change the init_from checkpoint"
    ):
        PretrainArguments(preset="tiny", init_from=str(checkpoint), config_overrides="num_hidden_layers=4")
    with pytest.raises(ValueError, match="tokenizer 'missing' is not a folder"):
        PretrainArguments(preset="tiny", tokenizer="missing")


def test_init_from_a_llama_with_architecture_ode_shared_converts_it(tmp_path):
    """`--init_from <llama> --architecture ode_shared` starts the ODE-shared model from the Llama's layers
    (`ode_shared_from_llama`), taking the conversion's settings as config overrides, and trains it."""
    first_args, first_training = _tiny_run(tmp_path / "llama")
    first_args.export_dir = str(tmp_path / "llama_export")
    first_training.max_steps = 1
    run_pretrain(first_args, first_training)  # the tiny preset: 2 layers
    with pytest.raises(ValueError, match=r"Unknown ODE conversion setting\(s\) \['num_pre_layer'\]"):
        PretrainArguments(
            preset="tiny",
            architecture="ode_shared",
            init_from=first_args.export_dir,
            config_overrides="num_pre_layer=1",
        )

    args = PretrainArguments(
        preset="tiny",
        architecture="ode_shared",
        scope="stdlib",
        max_files=40,
        block_size=32,
        max_eval_blocks=8,
        init_from=first_args.export_dir,
        config_overrides="num_pre_layers=1,solver=heun",
    )
    _, training = _tiny_run(tmp_path / "ode")
    training.max_steps = 1
    summary = run_pretrain(args, training)
    config = json.loads((tmp_path / "ode" / "config.json").read_text())
    assert summary["global_step"] == 1
    assert (config["model_type"], config["num_pre_layers"], config["solver"], config["num_steps"]) == (
        "effi_ode_shared",
        1,
        "heun",
        1,
    )
