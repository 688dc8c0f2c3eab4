"""OdeSharedForCausalLM forward: solver semantics, equivalence with a plain residual stack, compute, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_effitrain import OdeSharedConfig, OdeSharedForCausalLM
from hf_effitrain.hub.modeling_ode_shared import OdeStepRMSNorm, rms_norm
from hf_effitrain.models.presets import build_model
from tests.ode.ode_helpers import VOCAB, count_layer_calls, tiny_ode

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def test_default_forward_equals_trained_num_steps_exactly():
    model = tiny_ode(num_steps=6, ode_interval=6.0)
    default = model(IDS).logits
    assert torch.equal(default, model(IDS, num_steps=6).logits)
    model.train()  # fixed schedule, no dropout: training mode integrates the same steps
    assert torch.equal(default, model(IDS).logits)
    assert not torch.equal(default, model.eval()(IDS, num_steps=3).logits)


def _plain_residual_logits(model: OdeSharedForCausalLM, layers, ids):
    """x <- x + attn(norm(x)); x <- x + mlp(norm(x)) for each layer in order, written out without the solver."""
    inner = model.model
    hidden = inner.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
    cos_sin = inner.rotary_emb(hidden, position_ids)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for layer in layers:
        attn, _ = layer.self_attn(rms_norm(hidden, layer.input_layernorm.weight, 1e-6), cos_sin, attention_mask=mask)
        hidden = hidden + attn
        hidden = hidden + layer.mlp(rms_norm(hidden, layer.post_attention_layernorm.weight, 1e-6))
    return model.lm_head(rms_norm(hidden, inner.norm.weight, 1e-6))


def test_unshared_stack_with_unit_step_is_the_plain_residual_stack():
    model = tiny_ode(num_pre_layers=2, num_post_layers=1, num_steps=1, ode_interval=1.0, attn_implementation="eager")
    layers = [*model.model.pre_layers, model.model.shared_blocks[0][0], *model.model.post_layers]
    torch.testing.assert_close(model(IDS).logits, _plain_residual_logits(model, layers, IDS), rtol=1e-5, atol=1e-5)


def test_shared_block_with_unit_steps_repeats_the_layer():
    model = tiny_ode(num_steps=5, ode_interval=5.0, attn_implementation="eager")
    layers = [model.model.shared_blocks[0][0]] * 5
    torch.testing.assert_close(model(IDS).logits, _plain_residual_logits(model, layers, IDS), rtol=1e-5, atol=1e-5)


def test_unit_step_stack_matches_llama_with_the_same_weights():
    model = tiny_ode(num_pre_layers=2, num_post_layers=1, num_steps=1, ode_interval=1.0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=4,
        max_position_embeddings=256,
    )
    llama = LlamaForCausalLM(config).eval()
    ode_layers = [*model.model.pre_layers, model.model.shared_blocks[0][0], *model.model.post_layers]
    for llama_layer, ode_layer in zip(llama.model.layers, ode_layers):
        llama_layer.load_state_dict(ode_layer.state_dict())
    llama.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
    llama.model.norm.load_state_dict(model.model.norm.state_dict())
    llama.lm_head.load_state_dict(model.lm_head.state_dict())
    torch.testing.assert_close(model(IDS).logits, llama(IDS).logits, rtol=1e-5, atol=1e-5)


def test_euler_step_scales_the_block_update_by_h():
    """Two Euler steps of h = 1.5 over [0, 3], written out by hand from the layer's vector field."""
    model = tiny_ode(num_steps=2, ode_interval=3.0, attn_implementation="eager")
    layer, inner = model.model.shared_blocks[0][0], model.model
    hidden = inner.embed_tokens(IDS)
    cos_sin = inner.rotary_emb(hidden, torch.arange(IDS.shape[1]).unsqueeze(0))
    mask = torch.full((IDS.shape[1], IDS.shape[1]), float("-inf")).triu(1)[None, None]
    for _ in range(2):
        _, field = layer(hidden, None, 1.0, attention_mask=mask, position_embeddings=cos_sin)
        hidden = hidden + 1.5 * field
    expected = model.lm_head(rms_norm(hidden, inner.norm.weight, 1e-6))
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver, evaluations_per_step", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_cutting_steps_cuts_block_evaluations(solver, evaluations_per_step):
    model = tiny_ode(
        num_pre_layers=1, num_post_layers=1, shared_block_layers=2, num_steps=8, ode_interval=8.0, solver=solver
    )
    for steps in (8, 4, 2, 1):
        with count_layer_calls(model) as counts:
            model(IDS, num_steps=steps)
        assert counts["model.pre_layers.0"] == 1 and counts["model.post_layers.0"] == 1
        assert counts["model.shared_blocks.0.0"] == counts["model.shared_blocks.0.1"] == steps * evaluations_per_step
        assert model.model.cache_slots([steps]) == sum(counts.values())


def test_several_shared_blocks_take_their_own_steps_and_intervals():
    model = tiny_ode(num_shared_blocks=2, num_steps=[4, 2], ode_interval=[4.0, 2.0])
    assert model.config.block_intervals() == [4.0, 2.0]
    with count_layer_calls(model) as counts:
        model(IDS, num_steps=[2, 1])
    assert counts == {"model.shared_blocks.0.0": 2, "model.shared_blocks.1.0": 1}
    with count_layer_calls(model) as counts:
        model(IDS, num_steps=4)  # a total is split evenly over the blocks
    assert counts == {"model.shared_blocks.0.0": 2, "model.shared_blocks.1.0": 2}


@pytest.mark.parametrize("num_steps, intervals", [([1, 3], [1.0, 3.0]), (6, [3.0, 3.0]), ([2, 2], [2.0, 2.0])])
def test_default_intervals_give_unit_steps_in_every_block(num_steps, intervals):
    config = OdeSharedConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_shared_blocks=2,
        num_steps=num_steps,
    )
    assert config.block_intervals() == intervals
    assert [i / n for i, n in zip(config.block_intervals(), config.block_steps())] == [1.0, 1.0]


def test_second_order_solvers_agree_with_euler_as_steps_grow():
    """All three solvers approximate the same ODE: at many small steps they get close to each other."""
    logits = {
        s: tiny_ode(num_steps=2, ode_interval=2.0, solver=s)(IDS, num_steps=64).logits
        for s in ("euler", "heun", "midpoint")
    }
    coarse = tiny_ode(num_steps=2, ode_interval=2.0, solver="euler")(IDS, num_steps=1).logits
    assert (logits["heun"] - logits["midpoint"]).abs().max() < (logits["heun"] - coarse).abs().max() / 10


def test_ode_step_rms_norm_equals_the_unfused_path():
    torch.manual_seed(0)
    fused, plain = OdeStepRMSNorm(16), LlamaRMSNorm(16)
    with torch.no_grad():
        fused.weight.normal_()
        plain.weight.copy_(fused.weight)
    x, update = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    for h in (1.0, 0.5, 2.0):
        new_x, normed = fused(x, update, h)
        assert torch.equal(new_x, x + h * update)
        assert torch.equal(normed, plain(x + h * update))


def test_hidden_states_cover_every_evaluation():
    model = tiny_ode(num_steps=4)
    out = model(IDS, num_steps=2, output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings, after step 1, final normed state
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(IDS))


def test_preset_and_auto_class():
    model = build_model("tiny", "ode_shared", vocab_size=VOCAB, num_pre_layers=1)
    assert isinstance(model, OdeSharedForCausalLM)
    assert model.config.num_hidden_layers == 2 and model.config.num_steps == 2  # tiny preset: 2 layers of compute
    assert isinstance(
        AutoModelForCausalLM.from_config(
            OdeSharedConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4)
        ),
        OdeSharedForCausalLM,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": [2, 2]}, "num_shared_blocks=1"),
        ({"solver": "rk4"}, "Unknown solver 'rk4'"),
        ({"ode_interval": 0.0}, "ode_interval"),
        ({"ode_interval": -2.0}, "ode_interval"),
        ({"num_hidden_layers": 3, "num_pre_layers": 1}, "do not add up"),
        ({"num_shared_blocks": 0}, "num_shared_blocks"),
        ({"num_shared_blocks": 2, "num_steps": 5}, "not divisible"),
        ({"train_step_schedule": "cosine"}, "Unknown train_step_schedule"),
        ({"train_num_steps_choices": [4, 0]}, "train_num_steps_choices"),
        ({"train_num_steps_choices": "2|x"}, "not a list of integers"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OdeSharedConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, **kwargs)


@pytest.mark.parametrize(
    "num_steps, error", [(0, ValueError), (-1, ValueError), ([2, 2], ValueError), (2.5, TypeError)]
)
def test_forward_rejects_bad_num_steps(num_steps, error):
    with pytest.raises(error, match="num_steps"):
        tiny_ode()(IDS, num_steps=num_steps)
