"""Helpers for the ODE-shared tests: tiny models and a layer-evaluation counter."""

from __future__ import annotations

import contextlib
from collections import Counter

import torch

from hf_effitrain import OdeSharedConfig, OdeSharedForCausalLM

VOCAB = 128


def tiny_ode(seed: int = 0, **overrides) -> OdeSharedForCausalLM:
    """A hidden-32 ODE-shared model in float32 eval mode (one shared layer, 4 default steps unless overridden)."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_steps=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
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
