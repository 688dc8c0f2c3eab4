"""MSN fine-tuning through NoisySFTTrainer: one noise segment of L tokens inside each completion, drawn by the collator
and keyed on (seed, sample index, epoch); clean labels; eval untouched; LoRA trains; resuming reproduces the run."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_effitrain import MSNNoiseCollator, NoisySFTConfig, NoisySFTTrainer
from hf_effitrain.methods.msn.collator import INDEX_COLUMN
from tests.testing_utils import TINY_VOCAB, tiny_model

L = 3


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, TINY_VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def _text(rng, n):
    return " ".join(f"t{int(t)}" for t in torch.randint(3, TINY_VOCAB, (n,), generator=rng))


def _prompt_completion(n=24, conversational=False):
    rng = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        prompt, completion = (
            _text(rng, int(torch.randint(2, 8, (), generator=rng))),
            _text(rng, int(torch.randint(L, 12, (), generator=rng))),
        )
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": completion})
    return Dataset.from_list(rows)


@pytest.mark.parametrize(
    ("field", "value"),
    [("noise_length", -1), ("noise_length", 2.5), ("noise_fraction", 1.5), ("noise_kind", "gaussian")],
)
def test_msn_config_validation(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        NoisySFTConfig(output_dir=str(tmp_path), **{field: value})


class _ForwardRecorder:
    """Records (training?, input_ids, labels) of every forward that reaches the model."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append(
            (module.training, kwargs["input_ids"].clone(), kwargs.get("labels"), kwargs.get("position_ids"))
        )


def _config(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        use_cpu=True,
        noise_length=L,
        max_length=64,
        dataloader_num_workers=0,
    )
    return NoisySFTConfig(**{**defaults, **overrides})


def _check_batches(recorder, position_ids_expected: bool):
    train = [c for c in recorder.calls if c[0]]
    evals = [c for c in recorder.calls if not c[0]]
    assert train and evals
    for _, ids, labels, position_ids in train:
        assert (position_ids is not None) == position_ids_expected
        clean = torch.where(labels != -100, labels, ids)  # labels are clean copies of the completion ids
        changed = ids != clean
        assert changed.any()
        for row in range(ids.shape[0]):
            positions = changed[row].nonzero().flatten().tolist()
            if position_ids is None and positions:
                assert positions[-1] - positions[0] < L  # inside one window of L
            assert (labels[row, positions] != -100).all()
    for _, ids, labels, _ in evals:
        assert torch.equal(torch.where(labels != -100, labels, ids), ids)  # eval batches are never corrupted


@pytest.mark.parametrize("variant", ["prompt_completion", "conversational_packed"])
def test_msn_trainer_corrupts_training_batches_only(tmp_path, variant):
    conversational = variant == "conversational_packed"
    data = _prompt_completion(conversational=conversational)
    model = tiny_model("llama")
    recorder = _ForwardRecorder(model)
    trainer = NoisySFTTrainer(
        model=model,
        args=_config(tmp_path, packing=conversational, eval_strategy="steps", eval_steps=2),
        train_dataset=data,
        eval_dataset=data.select(range(8)),
        processing_class=_tokenizer(),
    )
    trainer.train()
    _check_batches(recorder, position_ids_expected=conversational)
    logged = [entry for entry in trainer.state.log_history if "noised_samples" in entry]
    assert logged and all(entry["noised_samples"] > 0.5 for entry in logged)


def test_msn_lora_trains(tmp_path):
    from peft import LoraConfig

    model = tiny_model("qwen2")
    trainer = NoisySFTTrainer(
        model=model,
        args=_config(tmp_path, max_steps=5),
        train_dataset=_prompt_completion(),
        processing_class=_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("lora" in n for n in before)
    recorder = _ForwardRecorder(trainer.model.get_base_model())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert any((c[1] != torch.where(c[2] != -100, c[2], c[1])).any() for c in recorder.calls if c[0])


def test_msn_plain_sft_when_noise_length_zero(tmp_path):
    model = tiny_model("gpt2")
    recorder = _ForwardRecorder(model)
    trainer = NoisySFTTrainer(
        model=model,
        args=_config(tmp_path, noise_length=0, max_steps=2),
        train_dataset=_prompt_completion(),
        processing_class=_tokenizer(),
    )
    trainer.train()
    for training, ids, labels, _ in recorder.calls:
        assert torch.equal(torch.where(labels != -100, labels, ids), ids)


def test_msn_sft_cli_trains_and_exports(tmp_path, capsys):
    import json

    from transformers import GenerationConfig

    from hf_effitrain.cli import main as cli_main

    model_dir, data_file = tmp_path / "base", tmp_path / "sft.jsonl"
    tiny_model("llama").save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    data_file.write_text("\n".join(json.dumps(row) for row in _prompt_completion(16)))
    argv = [
        "sft",
        "--model",
        str(model_dir),
        "--dataset",
        str(data_file),
        "--output_dir",
        str(tmp_path / "run"),
        "--export_dir",
        str(tmp_path / "export"),
        "--noise-length",
        "3",
        "--noise_kind",
        "uniform",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--bf16",
        "false",
        "--gradient_checkpointing",
        "false",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--max_length",
        "64",
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n") :])
    assert summary["global_step"] == 2 and "eval_loss" not in summary["metrics"]  # a jsonl file has no validation split
    assert (tmp_path / "run" / "model.safetensors").is_file()
    generation = GenerationConfig.from_pretrained(tmp_path / "export")
    assert generation.tree_depth == 5 and generation.jacobi_draft_len == 5
    assert "noise_length" in (tmp_path / "export" / "README.md").read_text()
    with pytest.raises(ValueError, match="noise_length"):
        cli_main(argv[:-2] + ["--noise_length", "-2", "--overwrite_export", "true"])  # the export dir is full now
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sft", "--help"])
    assert exit_info.value.code == 0 and "--noise-length" in capsys.readouterr().out


def test_msn_resume_reproduces_the_uninterrupted_run(tmp_path):
    """The noise is a function of (seed, sample index, epoch): resuming mid-epoch 0 and running on into epoch 1 draws
    what the full run drew (12 samples, 2 x 2 per step: 3 steps per epoch)."""
    from safetensors.torch import load_file

    def trainer(output_dir):
        config = _config(
            output_dir,
            max_steps=4,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            save_strategy="steps",
            save_steps=2,
            logging_steps=10,
        )
        return NoisySFTTrainer(
            model=tiny_model("llama"), args=config, train_dataset=_prompt_completion(12), processing_class=_tokenizer()
        )

    full = trainer(tmp_path / "full")
    full.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4 and resumed.state.epoch > 1
    expected = load_file(tmp_path / "full" / "checkpoint-4" / "model.safetensors")
    got = {name: p.detach() for name, p in resumed.model.state_dict().items()}
    assert any(
        not torch.equal(t, load_file(tmp_path / "full" / "checkpoint-2" / "model.safetensors")[n])
        for n, t in expected.items()
    )
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def _clean(ids, labels):
    return torch.where(labels != -100, labels, ids)  # labels are clean copies of the completion ids


def test_msn_trainer_noise_is_the_collators_keyed_noise_and_changes_across_epochs(tmp_path):
    """Every training row the model sees equals the collator's noise for that dataset row alone in that epoch (the
    epoch reaching a persistent dataloader worker); the same rows get other noise in epoch 1; evaluating on the
    training set is clean; the index never reaches the model."""
    model = tiny_model("llama")
    recorder = _ForwardRecorder(model)
    config = _config(
        tmp_path, max_steps=-1, num_train_epochs=2, dataloader_num_workers=1, dataloader_persistent_workers=True
    )
    trainer = NoisySFTTrainer(
        model=model, args=config, train_dataset=_prompt_completion(8), processing_class=_tokenizer()
    )
    assert isinstance(trainer.data_collator, MSNNoiseCollator) and trainer.data_collator.seed == trainer.args.seed
    trainer.train()
    rows = {tuple(ex["input_ids"]): ex for ex in trainer.train_dataset}
    noise = [{}, {}]
    train_calls = [c for c in recorder.calls if c[0]]
    assert len(train_calls) == 4  # 2 steps per epoch
    for call, (_, ids, labels, _) in enumerate(train_calls):
        epoch = call // 2
        trainer.data_collator.set_epoch(epoch)
        for row in range(ids.shape[0]):
            length = int((labels[row] != -100).nonzero().max()) + 1  # the row ends with its EOS, padding follows
            example = rows[tuple(_clean(ids[row], labels[row])[:length].tolist())]  # the prepared row it came from
            expected = trainer.data_collator([example])["input_ids"][0]
            assert torch.equal(ids[row, : expected.numel()], expected)
            noise[epoch][example[INDEX_COLUMN]] = expected
    assert sorted(noise[0]) == sorted(noise[1]) == list(range(8))
    assert any(not torch.equal(noise[0][i], noise[1][i]) for i in range(8))
    recorder.calls.clear()
    trainer.evaluate(trainer.train_dataset)
    assert recorder.calls and all(torch.equal(_clean(ids, labels), ids) for _, ids, labels, _ in recorder.calls)


def test_msn_trainer_wraps_a_user_collator_and_refuses_an_msn_one(tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    user = DataCollatorForLanguageModeling(pad_token_id=2)
    model = tiny_model("gpt2")
    recorder = _ForwardRecorder(model)
    trainer = NoisySFTTrainer(
        model=model,
        args=_config(tmp_path, max_steps=1),
        data_collator=user,
        train_dataset=_prompt_completion(8),
        processing_class=_tokenizer(),
    )
    assert trainer.data_collator.collator is user
    trainer.train()
    assert any((ids != _clean(ids, labels)).any() for _, ids, labels, _ in recorder.calls)
    with pytest.raises(TypeError, match="pass the collator to wrap"):
        NoisySFTTrainer(
            model=model,
            args=_config(tmp_path),
            data_collator=MSNNoiseCollator(user, L),
            train_dataset=_prompt_completion(8),
            processing_class=_tokenizer(),
        )


def test_msn_trainer_streams_an_iterable_training_set(tmp_path):
    model = tiny_model("llama")
    recorder = _ForwardRecorder(model)
    trainer = NoisySFTTrainer(
        model=model,
        args=_config(tmp_path, max_steps=2),
        train_dataset=_prompt_completion(8).to_iterable_dataset(),
        processing_class=_tokenizer(),
    )
    trainer.train()
    assert len(recorder.calls) == 2 and all((ids != _clean(ids, labels)).any() for _, ids, labels, _ in recorder.calls)
    assert [entry["noised_samples"] for entry in trainer.state.log_history if "noised_samples" in entry] == [1.0, 1.0]
