"""Helpers for the ODE-shared tests: tiny models and a layer-evaluation counter."""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hf_effitrain import OdeSharedConfig, OdeSharedForCausalLM

VOCAB = 128


def tiny_ode(seed: int = 0, **overrides) -> OdeSharedForCausalLM:
    """A hidden-32 ODE-shared model in float32 eval mode (one shared layer, 4 default steps unless overridden)."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_steps=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return OdeSharedForCausalLM(OdeSharedConfig(**kwargs)).float().eval()


@contextlib.contextmanager
def count_layer_calls(model: OdeSharedForCausalLM):
    """Count forward calls of every decoder layer, keyed by its module name (e.g. `model.shared_blocks.0.0`)."""
    counts: Counter[str] = Counter()
    handles = []
    for name, module in model.named_modules():
        if type(module).__name__ == "OdeSharedDecoderLayer":
            handles.append(module.register_forward_hook(lambda mod, args, out, name=name: counts.update([name])))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def greedy_without_cache(model, ids: torch.Tensor, num_steps, new_tokens: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole sequence at every token: the cache-free reference."""
    for _ in range(new_tokens):
        logits = model(ids, num_steps=num_steps, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=-1)
    return ids


def ode_trainer(model, tmp_path, ids: torch.Tensor, **args) -> Trainer:
    """A stock `Trainer` over `ids` (inputs = labels) for 4 steps of batch 2 on CPU, no checkpoints."""
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        **args,
    )
    return Trainer(model=model, args=arguments, train_dataset=data)
