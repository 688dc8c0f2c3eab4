"""Training an ODE-shared model: step schedules, Trainer, LoRA, gradient checkpointing, Llama initialisation."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_effitrain.methods.ode.conversion import ode_shared_from_llama
from hf_effitrain.models.presets import parse_config_overrides
from tests.ode.ode_helpers import VOCAB, count_layer_calls, ode_trainer, tiny_ode

IDS = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def _steps_per_batch(model, batches: int) -> list[int]:
    steps = []
    for _ in range(batches):
        with count_layer_calls(model) as counts:
            model(IDS[:1])
        steps.append(counts["model.shared_blocks.0.0"])
    return steps


def test_random_schedule_draws_steps_per_batch_reproducibly_in_training_only():
    model = tiny_ode(
        num_steps=8, train_step_schedule="random", train_num_steps_choices=[2, 4, 8], train_step_seed=3
    ).train()
    drawn = _steps_per_batch(model, 24)
    assert set(drawn) == {2, 4, 8}
    assert (
        _steps_per_batch(
            tiny_ode(
                num_steps=8, train_step_schedule="random", train_num_steps_choices=[2, 4, 8], train_step_seed=3
            ).train(),
            24,
        )
        == drawn
    )
    assert set(_steps_per_batch(model.eval(), 3)) == {8}  # evaluation integrates with the default steps
    with count_layer_calls(model.train()) as counts:
        model(IDS[:1], num_steps=1)  # an explicit num_steps wins over the schedule
    assert counts["model.shared_blocks.0.0"] == 1


def test_random_schedule_default_choices_and_fixed_smaller_step():
    assert tiny_ode(num_steps=8, train_step_schedule="random").config.step_choices() == [8, 4, 2]
    model = tiny_ode(num_steps=4, train_num_steps=8).train()  # fixed schedule with half the step size
    assert set(_steps_per_batch(model, 2)) == {8}
    assert set(_steps_per_batch(model.eval(), 1)) == {4}


def test_schedule_fields_parse_from_config_overrides():
    overrides = parse_config_overrides(
        "train_step_schedule=random,train_num_steps_choices=2|4|8,num_steps=8,solver=heun,ode_interval=8"
    )
    model = tiny_ode(**overrides)
    assert model.config.train_num_steps_choices == [2, 4, 8] and model.config.solver == "heun"


def _trainer(model, tmp_path, **args):
    return ode_trainer(model, tmp_path, IDS, **args)


def test_trainer_trains_with_the_random_schedule(tmp_path):
    model = tiny_ode(num_steps=4, train_step_schedule="random", train_step_seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _trainer(model, tmp_path).train()
    changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p)]
    assert "model.shared_blocks.0.0.self_attn.q_proj.weight" in changed and "lm_head.weight" in changed


def test_lora_attaches_to_shared_layers_and_trains(tmp_path):
    model = get_peft_model(
        tiny_ode(),
        LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    )
    assert model.get_nb_trainable_parameters()[0] > 0
    base = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    lora_b = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}
    trainer = _trainer(model, tmp_path)
    trainer.train()
    assert all(torch.equal(base[name], p) for name, p in model.named_parameters() if name in base)
    assert any(not torch.equal(lora_b[name], p) for name, p in model.named_parameters() if name in lora_b)
    assert trainer.state.log_history[0]["loss"] > 0
    out = model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False, num_steps=2)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_gradient_checkpointing_gives_the_same_gradients(solver):
    reference, checkpointed = (
        tiny_ode(num_pre_layers=1, solver=solver).train(),
        tiny_ode(num_pre_layers=1, solver=solver).train(),
    )
    checkpointed.gradient_checkpointing_enable()
    for model in (reference, checkpointed):
        model(IDS, labels=IDS).loss.backward()
    for (name, p), q in zip(reference.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_trains_with_trainer(tmp_path):
    model = tiny_ode(num_steps=4, train_step_schedule="random")
    trainer = _trainer(model, tmp_path, gradient_checkpointing=True)
    trainer.train()
    assert model.model.shared_blocks[0][0].gradient_checkpointing
    assert all(entry["loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def _llama(num_layers: int, identical_middle: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=num_layers,
        max_position_embeddings=256,
    )
    llama = LlamaForCausalLM(config).eval()
    if identical_middle:
        for layer in llama.model.layers[2:-1]:
            layer.load_state_dict(llama.model.layers[1].state_dict())
    return llama


def test_init_from_llama_averages_middle_layers_and_copies_the_rest():
    llama = _llama(6)
    ode = ode_shared_from_llama(llama, num_pre_layers=1, num_post_layers=1, shared_block_layers=2)
    assert ode.config.num_steps == 2 and ode.config.ode_interval == 2.0  # 4 middle layers = 2 steps of a 2-layer block
    middle = llama.model.layers[1:5]
    shared = ode.model.shared_blocks[0]
    torch.testing.assert_close(
        shared[0].mlp.up_proj.weight, (middle[0].mlp.up_proj.weight + middle[2].mlp.up_proj.weight) / 2
    )
    torch.testing.assert_close(
        shared[1].self_attn.q_proj.weight, (middle[1].self_attn.q_proj.weight + middle[3].self_attn.q_proj.weight) / 2
    )
    assert torch.equal(ode.model.pre_layers[0].self_attn.k_proj.weight, llama.model.layers[0].self_attn.k_proj.weight)
    assert torch.equal(ode.model.post_layers[0].mlp.down_proj.weight, llama.model.layers[5].mlp.down_proj.weight)
    assert torch.equal(ode.lm_head.weight, llama.lm_head.weight) and torch.equal(
        ode.model.norm.weight, llama.model.norm.weight
    )


def test_init_from_llama_with_identical_middle_layers_reproduces_the_llama():
    llama = _llama(5, identical_middle=True)
    ode = ode_shared_from_llama(llama, num_pre_layers=1, num_post_layers=1).eval()
    torch.testing.assert_close(ode(IDS).logits, llama(IDS).logits, rtol=1e-5, atol=1e-5)


def test_init_from_llama_errors():
    with pytest.raises(ValueError, match="do not split"):
        ode_shared_from_llama(_llama(5), num_pre_layers=1, num_post_layers=1, num_shared_blocks=2)
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        ode_shared_from_llama(tiny_ode())
