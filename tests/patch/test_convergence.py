"""A tiny model trained ONLY at patch level on the stdlib corpus gets better at TOKEN-level prediction."""

import pytest
import torch

from hf_effitrain import PatchTrainer, PatchTrainingArguments
from hf_effitrain.data import load_corpus, pack_dataset, train_tokenizer
from hf_effitrain.models.presets import build_model


@pytest.fixture(scope="module")
def stdlib_blocks():
    corpus = load_corpus("python", scope="stdlib", max_files=40)
    tokenizer = train_tokenizer(corpus, vocab_size=320)
    train = pack_dataset(corpus["train"], tokenizer, 32)
    validation = pack_dataset(corpus["validation"], tokenizer, 32).select(range(16))
    return tokenizer, train, validation


def test_patch_level_training_lowers_the_token_level_validation_loss(stdlib_blocks, tmp_path):
    tokenizer, train, validation = stdlib_blocks
    torch.manual_seed(0)
    model = build_model("tiny", "llama", vocab_size=len(tokenizer), max_position_embeddings=64)
    # equal-tokens batching: a patch step takes 32 / 4 = 8 sequences of 4 x 32 tokens (164k tokens in 160 steps)
    args = PatchTrainingArguments(
        output_dir=str(tmp_path),
        patch_size=4,
        patch_fraction=1.0,
        max_steps=160,
        per_device_train_batch_size=32,
        learning_rate=1e-2,
        warmup_steps=0.1,
        eval_strategy="steps",
        eval_steps=80,
        eval_on_start=True,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = PatchTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation)
    trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert trainer.patch_schedule.token_steps == 0 and all(r["patch_stage"] == 1.0 for r in evals)
    start, end = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    # from about ln(320) = 5.77 at init; the model never saw a token-level step
    assert end < start - 1.0, (start, end)
    patch_evals = [r["eval_patch_loss"] for r in trainer.state.log_history if "eval_patch_loss" in r]
    assert len(patch_evals) == len(evals) == 3 and patch_evals[-1] < patch_evals[0]
