"""An exported ODE-shared checkpoint reloads and decodes at any num_steps in a process without hf_effitrain."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_effitrain import export_pretrained
from tests.ode.ode_helpers import VOCAB, tiny_ode
from tests.testing_utils import run_without_package

PROMPT = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))


def _step_aware_model():
    """Step-aware, two shared blocks, midpoint, consistency on; a non-zero conditioning stands in for a trained one."""
    model = tiny_ode(
        num_pre_layers=1, num_shared_blocks=2, num_steps=4, solver="midpoint", step_aware=True, consistency_weight=0.5
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".step_conditioning.out_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


MODELS = {
    "plain heun": lambda: tiny_ode(num_pre_layers=1, num_steps=4, solver="heun"),
    "step-aware midpoint": _step_aware_model,
}
# Run in the package-free process after the logits / generate checks, for the step-aware model only.
STEP_AWARE_CHECKS = """
assert model.config.step_aware and model.config.consistency_weight == 0.5
out = model.train()(prompt, labels=prompt)
assert out.consistency_loss > 0 and abs(out.loss - out.lm_loss - 0.5 * out.consistency_loss) < 1e-5
"""


@pytest.mark.parametrize("name", list(MODELS))
def test_export_and_reload_without_the_package(tmp_path, name):
    model = MODELS[name]()
    solver = model.config.solver
    path = export_pretrained(model, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "effi_ode_shared" and config["solver"] == solver
    assert config["step_aware"] == (name == "step-aware midpoint")
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ode_shared.OdeSharedForCausalLM"
    assert {"modeling_ode_shared.py", "configuration_ode_shared.py", "generation_effi.py", "model.safetensors"} <= {
        p.name for p in path.iterdir()
    }
    expected = {"prompt": PROMPT}
    for steps in (4, 2, 1) if model.config.num_shared_blocks == 1 else (4, 2):
        expected[steps] = (
            model(PROMPT, num_steps=steps).logits,
            model.generate(PROMPT, max_new_tokens=6, min_new_tokens=6, do_sample=False, num_steps=steps),
        )
    torch.save(expected, tmp_path / "expected.pt")
    script = """
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("ckpt", trust_remote_code=True).eval()
    assert type(model).__name__ == "OdeSharedForCausalLM" and "hf_effitrain" not in type(model).__module__, type(model)
    expected = torch.load("expected.pt")
    prompt = expected.pop("prompt")
    for steps, (logits, generated) in expected.items():
        torch.testing.assert_close(model(prompt, num_steps=steps).logits, logits, rtol=1e-6, atol=1e-6)
        out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, num_steps=steps)
        assert torch.equal(out, generated), (steps, out, generated)
    print("reloaded", type(model).__module__)
    """
    if model.config.step_aware:
        script += textwrap.indent(STEP_AWARE_CHECKS, "    ")
    proc = run_without_package(script, cwd=tmp_path)
    assert "reloaded transformers_modules" in proc.stdout


def test_save_pretrained_round_trip_in_process(tmp_path):
    model = tiny_ode(num_shared_blocks=2, num_steps=[2, 4], ode_interval=[2.0, 3.0], train_step_schedule="random")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_steps == [2, 4] and reloaded.config.block_intervals() == [2.0, 3.0]
    assert torch.equal(reloaded(PROMPT, num_steps=[1, 1]).logits, model(PROMPT, num_steps=[1, 1]).logits)
