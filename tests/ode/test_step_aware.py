"""Step-aware shared blocks (conditioning on t and h) and the step-consistency term of OdeSharedForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_effitrain import OdeSharedConfig
from hf_effitrain.hub.modeling_ode_shared import OdeStepConditioning
from hf_effitrain.methods.ode.conversion import ode_shared_from_llama
from hf_effitrain.models.presets import parse_config_overrides
from tests.ode.ode_helpers import VOCAB, count_layer_calls, greedy_without_cache, ode_trainer, tiny_ode

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
SHARING = {
    "one layer": {},
    "partial sharing": {"num_pre_layers": 1, "num_post_layers": 1},
    "two-layer block, two blocks": {"shared_block_layers": 2, "num_shared_blocks": 2, "num_pre_layers": 1},
}


def _aware_copy(plain, **overrides):
    """A step-aware model with the plain model's weights; its conditioning stays as initialised."""
    aware = tiny_ode(**{**_settings(plain), "step_aware": True, **overrides})
    result = aware.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert all(".step_conditioning." in key for key in result.missing_keys)
    return aware


def _settings(model) -> dict:
    names = (
        "num_pre_layers",
        "num_post_layers",
        "shared_block_layers",
        "num_shared_blocks",
        "num_steps",
        "ode_interval",
        "solver",
    )
    return {name: getattr(model.config, name) for name in names}


def _perturb_conditioning(model, seed: int = 1, scale: float = 0.3):
    """Stand-in for a trained conditioning: non-zero output projections."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, OdeStepConditioning):
                module.out_weight.copy_(torch.randn(module.out_weight.shape, generator=generator) * scale)
                module.out_bias.copy_(torch.randn(module.out_bias.shape, generator=generator) * scale)
    return model


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
@pytest.mark.parametrize("sharing", list(SHARING))
def test_untrained_step_aware_model_equals_the_plain_one_exactly(solver, sharing):
    plain = tiny_ode(solver=solver, **SHARING[sharing])
    aware = _aware_copy(plain)
    assert all(torch.count_nonzero(m.out_weight) == 0 for m in aware.modules() if isinstance(m, OdeStepConditioning))
    for steps in (4, 2):
        assert torch.equal(aware(IDS, num_steps=steps).logits, plain(IDS, num_steps=steps).logits), steps
    assert not torch.equal(_perturb_conditioning(aware)(IDS, num_steps=2).logits, plain(IDS, num_steps=2).logits)


def test_only_shared_layers_are_conditioned():
    model = tiny_ode(
        step_aware=True,
        num_pre_layers=1,
        num_post_layers=1,
        shared_block_layers=2,
        num_shared_blocks=2,
        step_embedding_dim=8,
    )
    conditioned = {name for name, module in model.named_modules() if isinstance(module, OdeStepConditioning)}
    assert conditioned == {f"model.shared_blocks.{b}.{j}.step_conditioning" for b in range(2) for j in range(2)}
    per_layer = sum(p.numel() for p in model.model.shared_blocks[0][0].step_conditioning.parameters())
    assert per_layer == 2 * 8**2 + 8 + 6 * 32 * (8 + 1)  # the count the config docstring gives


@pytest.mark.parametrize(
    "solver, expected",
    [
        ("euler", [(0.0, 0.5), (0.5, 0.5)]),
        ("heun", [(0.0, 0.5), (0.5, 0.5), (0.5, 0.5), (1.0, 0.5)]),
        ("midpoint", [(0.0, 0.5), (0.25, 0.5), (0.5, 0.5), (0.75, 0.5)]),
    ],
)
def test_every_evaluation_reads_its_depth_and_step_size(solver, expected):
    """(t / interval, h / interval) per evaluation: Heun's second at t + h, midpoint's at t + h / 2."""
    model = tiny_ode(step_aware=True, num_steps=4, ode_interval=4.0, solver=solver)
    seen = []
    conditioning = model.model.shared_blocks[0][0].step_conditioning
    handle = conditioning.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0])))
    try:
        model(IDS, num_steps=2)
    finally:
        handle.remove()
    assert seen == expected


def _config_dict_without_new_fields(path) -> None:
    """Rewrite a saved config.json as a checkpoint written before the step-aware fields existed."""
    config = json.loads((path / "config.json").read_text())
    for key in ("step_aware", "step_embedding_dim", "consistency_weight", "consistency_samples"):
        config.pop(key)
    (path / "config.json").write_text(json.dumps(config))


def test_checkpoint_without_step_fields_loads_unchanged_and_can_be_made_step_aware(tmp_path):
    plain = tiny_ode(num_pre_layers=1, solver="heun")
    plain.save_pretrained(tmp_path)
    _config_dict_without_new_fields(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert reloaded.config.step_aware is False and reloaded.config.consistency_weight == 0.0
    assert not any(info.values()), info
    assert torch.equal(reloaded.eval()(IDS).logits, plain(IDS).logits)
    # Fine-tuning a plain checkpoint into a step-aware one: the new weights start at zero, the function unchanged.
    aware, info = AutoModelForCausalLM.from_pretrained(tmp_path, step_aware=True, output_loading_info=True)
    assert info["missing_keys"] and all(".step_conditioning." in key for key in info["missing_keys"])
    assert all(torch.count_nonzero(m.out_weight) == 0 for m in aware.modules() if isinstance(m, OdeStepConditioning))
    assert torch.equal(aware.eval()(IDS, num_steps=2).logits, plain(IDS, num_steps=2).logits)


def test_step_aware_checkpoint_round_trip(tmp_path):
    model = _perturb_conditioning(
        tiny_ode(
            step_aware=True, step_embedding_dim=8, consistency_weight=0.5, consistency_samples=2, num_shared_blocks=2
        )
    )
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    config = reloaded.config
    assert (config.step_aware, config.step_embedding_dim, config.consistency_weight, config.consistency_samples) == (
        True,
        8,
        0.5,
        2,
    )
    for steps in (4, 2):  # equal up to float32 rounding (the loaded weights' memory layout picks other kernels)
        torch.testing.assert_close(
            reloaded(IDS, num_steps=steps).logits, model(IDS, num_steps=steps).logits, rtol=1e-6, atol=1e-6
        )


def test_step_fields_parse_from_config_overrides():
    overrides = parse_config_overrides(
        "step_aware=true,step_embedding_dim=16,consistency_weight=0.5,consistency_samples=2"
    )
    config = tiny_ode(**overrides).config
    assert (config.step_aware, config.step_embedding_dim, config.consistency_weight, config.consistency_samples) == (
        True,
        16,
        0.5,
        2,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"step_embedding_dim": 7}, "step_embedding_dim"),
        ({"step_embedding_dim": 0}, "step_embedding_dim"),
        ({"consistency_weight": -0.1}, "consistency_weight"),
        ({"consistency_samples": 0}, "consistency_samples"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OdeSharedConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, **kwargs)


def test_consistency_term_only_in_training_with_labels_and_a_weight():
    model = tiny_ode(step_aware=True, num_steps=4).train()
    out = model(IDS, labels=IDS)
    assert out.consistency_loss is None and torch.equal(out.loss, out.lm_loss)  # weight 0: off, no extra compute
    model = tiny_ode(step_aware=True, num_steps=4, consistency_weight=0.5).train()
    assert model(IDS).consistency_loss is None  # no labels
    assert model.eval()(IDS, labels=IDS).consistency_loss is None  # evaluation
    out = model.train()(IDS, labels=IDS)
    assert out.consistency_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.consistency_loss)
    torch.testing.assert_close(out.lm_loss, model.eval()(IDS, labels=IDS).loss)  # the LM part is the plain loss


def test_consistency_gradient_flows_only_through_the_big_step():
    """Written out by hand: one Euler step of 2h from x_0 (detached) against the detached state after two steps of h."""
    model = _perturb_conditioning(
        tiny_ode(
            num_pre_layers=1,
            num_post_layers=1,
            step_aware=True,
            num_steps=2,
            ode_interval=2.0,
            consistency_weight=1.0,
            attn_implementation="eager",
        )
    ).train()
    out = model(IDS, labels=IDS, output_hidden_states=True)
    out.consistency_loss.backward()
    received = {name for name, p in model.named_parameters() if p.grad is not None and torch.count_nonzero(p.grad) > 0}
    assert received and all(name.startswith("model.shared_blocks.0.0.") for name in received), received
    # hidden_states: embeddings, x_0 (after the pre layer), x_1, x_2 (entering the post layer), final normed state
    x0, x2 = out.hidden_states[1].detach(), out.hidden_states[3].detach()
    layer = model.model.shared_blocks[0][0]
    cos_sin = model.model.rotary_emb(x0, torch.arange(IDS.shape[1]).unsqueeze(0))
    mask = torch.full((IDS.shape[1], IDS.shape[1]), float("-inf")).triu(1)[None, None]
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    model.zero_grad()
    _, field = layer(
        x0, None, 1.0, attention_mask=mask, position_embeddings=cos_sin, step_condition=(0.0, 1.0)
    )  # t = 0, 2h = interval
    student = x0 + 2.0 * field
    expected = ((student - x2).pow(2).sum(-1) / (x2.pow(2).sum(-1) + 1e-6)).mean()
    torch.testing.assert_close(out.consistency_loss, expected, rtol=1e-5, atol=1e-7)
    expected.backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("solver, evaluations", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_consistency_with_partial_sharing_and_several_blocks(solver, evaluations):
    model = tiny_ode(
        solver=solver,
        step_aware=True,
        num_pre_layers=1,
        num_post_layers=1,
        shared_block_layers=2,
        num_shared_blocks=2,
        num_steps=8,
        ode_interval=8.0,
        consistency_weight=1.0,
        consistency_samples=2,
        train_step_seed=0,
    ).train()
    with count_layer_calls(model) as counts:
        out = model(IDS, labels=IDS)
    # 4 steps per block on the trajectory + 2 big steps per block for the consistency pairs
    assert counts["model.pre_layers.0"] == counts["model.post_layers.0"] == 1
    for block in (0, 1):
        assert (
            counts[f"model.shared_blocks.{block}.0"]
            == counts[f"model.shared_blocks.{block}.1"]
            == (4 + 2) * evaluations
        )
    assert torch.isfinite(out.loss) and out.consistency_loss > 0
    out.consistency_loss.backward()
    assert all(
        p.grad is None or torch.count_nonzero(p.grad) == 0
        for name, p in model.named_parameters()
        if "shared_blocks" not in name
    )


def test_consistency_samples_are_capped_and_single_steps_add_nothing():
    model = tiny_ode(step_aware=True, num_steps=4, consistency_weight=1.0, consistency_samples=10).train()
    with count_layer_calls(model) as counts:
        model(IDS, labels=IDS)
    assert counts["model.shared_blocks.0.0"] == 4 + 3  # every start state x_0, x_1, x_2
    out = model(IDS, labels=IDS, num_steps=1)
    assert out.consistency_loss == 0 and torch.equal(out.loss, out.lm_loss)


def test_consistency_refuses_a_filled_cache():
    model = tiny_ode(step_aware=True, num_steps=2, consistency_weight=1.0)
    cache = model(IDS, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="without a filled KV cache"):
        model.train()(IDS[:, :1], labels=IDS[:, :1], past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_gradient_checkpointing_gives_the_same_gradients_with_consistency(solver):
    settings = dict(
        solver=solver, step_aware=True, num_pre_layers=1, num_steps=4, consistency_weight=1.0, train_step_seed=0
    )
    reference, checkpointed = (_perturb_conditioning(tiny_ode(**settings)).train() for _ in range(2))
    checkpointed.gradient_checkpointing_enable()
    for model in (reference, checkpointed):
        model(IDS, labels=IDS).loss.backward()
    for (name, p), q in zip(reference.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_cached_generate_equals_recomputation(solver):
    model = _perturb_conditioning(
        tiny_ode(step_aware=True, num_pre_layers=1, num_shared_blocks=2, num_steps=4, solver=solver)
    )
    for steps in (4, 2):
        generated = model.generate(IDS[:1, :5], max_new_tokens=6, min_new_tokens=6, do_sample=False, num_steps=steps)
        assert torch.equal(generated, greedy_without_cache(model, IDS[:1, :5], steps, 6)), steps


def _trainer(model, tmp_path, **args):
    return ode_trainer(
        model, tmp_path, torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(4)), **args
    )


def test_stock_trainer_trains_the_conditioning_with_consistency(tmp_path):
    model = tiny_ode(
        step_aware=True, num_steps=4, train_step_schedule="random", consistency_weight=1.0, train_step_seed=0
    )
    trainer = _trainer(model, tmp_path, gradient_accumulation_steps=2)
    trainer.train()
    conditioning = model.model.shared_blocks[0][0].step_conditioning
    assert torch.count_nonzero(conditioning.out_weight) > 0  # left its zero initialisation
    assert all(entry["loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_lora_on_a_step_aware_model_with_consistency(tmp_path):
    base = _perturb_conditioning(
        tiny_ode(step_aware=True, num_steps=4, consistency_weight=1.0, train_step_schedule="random", train_step_seed=0)
    )
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["step_conditioning"])
    model = get_peft_model(base, lora)
    lora_b = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    out = model.train()(IDS, labels=IDS)
    assert out.consistency_loss is not None  # peft forwards to the model's own loss
    _trainer(model, tmp_path).train()
    assert any(not torch.equal(lora_b[name], p) for name, p in model.named_parameters() if name in lora_b)
    assert all(torch.equal(frozen[name], p) for name, p in model.named_parameters() if name in frozen)
    merged = model.merge_and_unload().eval()
    prompt = IDS[:1, :5]
    assert torch.equal(
        merged.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, num_steps=2),
        greedy_without_cache(merged, prompt, 2, 4),
    )


def test_init_from_llama_keeps_a_step_aware_model_equal_to_the_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=256,
    )
    llama = LlamaForCausalLM(config).eval()
    for layer in llama.model.layers[2:-1]:
        layer.load_state_dict(llama.model.layers[1].state_dict())
    ode = ode_shared_from_llama(llama, num_pre_layers=1, num_post_layers=1, step_aware=True).eval()
    assert ode.config.step_aware
    torch.testing.assert_close(ode(IDS).logits, llama(IDS).logits, rtol=1e-5, atol=1e-5)
