"""Taking the LM head's place: the hooked hidden states reproduce the model's logits, the head is refused when a
fused loss cannot replace it, and the chunked argmax equals the logits' argmax."""

import logging

import pytest
import torch

from hf_effitrain.integrations import lm_head as lm_head_module
from hf_effitrain.integrations.lm_head import (
    fusable_lm_head,
    fused_causal_lm_loss,
    fused_loss_enabled,
    linear_argmax,
    lm_head_hidden_states,
)
from tests.testing_utils import ARCHITECTURES, clear_log_once, tiny_model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_hooked_hidden_states_give_the_model_logits(architecture):
    model = tiny_model(architecture)
    input_ids = torch.randint(0, 128, (2, 9))
    head = fusable_lm_head(model)
    assert head is not None
    hidden, outputs = lm_head_hidden_states(model, head, input_ids=input_ids)
    assert outputs.logits.shape[1] == 0  # the model computed no logits of its own
    torch.testing.assert_close(hidden @ head.weight.T, model(input_ids).logits)


def test_head_with_bias_is_refused_with_one_log_line(caplog, monkeypatch):
    clear_log_once()
    model = tiny_model("llama")
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(128))
    with caplog.at_level(logging.INFO, logger=lm_head_module.__name__):
        assert fusable_lm_head(model) is None and fusable_lm_head(model) is None
    assert len([r for r in caplog.records if "has a bias" in r.getMessage()]) == 1


def test_model_that_never_calls_its_head_is_named():
    class Headless(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(ValueError, match="never called its output embeddings"):
        lm_head_hidden_states(Headless(), torch.nn.Linear(4, 4), input_ids=torch.zeros(1, 2))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_linear_argmax_matches_the_logits(chunk_size):
    hidden, weight = torch.randn(11, 8), torch.randn(50, 8)
    torch.testing.assert_close(linear_argmax(hidden, weight, chunk_size), (hidden @ weight.T).argmax(-1))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("num_items", [None, 7])
def test_fused_causal_lm_loss_is_the_model_loss(architecture, num_items):
    model = tiny_model(architecture).train()
    input_ids = torch.randint(0, 128, (2, 9))
    labels = input_ids.clone()
    labels[0, :3] = -100
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    stock = model(input_ids=input_ids, labels=labels, **kwargs).loss
    fused = fused_causal_lm_loss(model, {"input_ids": input_ids, "labels": labels}, kwargs.get("num_items_in_batch"))
    torch.testing.assert_close(fused, stock)
    assert fused_causal_lm_loss(model, {"input_ids": input_ids}) is None  # no labels: the stock path


def test_fused_loss_enabled_defaults_to_cuda_only():
    model = tiny_model("llama")
    assert fused_loss_enabled(None, model) is False
    assert fused_loss_enabled(True, model) is True and fused_loss_enabled(False, model) is False
