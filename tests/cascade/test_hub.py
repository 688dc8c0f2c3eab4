"""CascadeConfig / CascadeForCausalLM: one safetensors checkpoint, reload with and without the package."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import hf_effitrain
from hf_effitrain.hub.configuration_cascade import SPECULATIVE_DEFAULTS, CascadeConfig
from hf_effitrain.hub.modeling_cascade import CascadeForCausalLM
from tests.cascade.cascade_helpers import prompts, tiny_pair
from tests.testing_utils import run_without_package, tiny_model


def test_config_holds_stock_sub_configs_and_round_trips(tmp_path):
    small, large = tiny_pair("llama")
    gpt_small, _ = tiny_pair("gpt2")
    config = CascadeConfig(small=gpt_small.config, large=large.config.to_dict(), deferral="token", threshold=-math.inf)
    assert config.small.model_type == "gpt2" and config.large.model_type == "llama"
    assert set(CascadeConfig.sub_configs) == {"small", "large"}
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, CascadeConfig)
    assert reloaded.small.n_embd == gpt_small.config.n_embd and reloaded.large.hidden_size == large.config.hidden_size
    assert reloaded.deferral == "token" and reloaded.threshold == -math.inf
    assert isinstance(CascadeConfig().small, LlamaConfig)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 1.0}, "outside the range"),
        ({"rule": "entropy"}, "rule"),
        ({"deferral": "chunk"}, "deferral"),
        ({"quantile": -0.1}, "quantile"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CascadeConfig(**kwargs)


def test_from_models_errors_and_warning(caplog):
    small = tiny_model("llama")
    with pytest.raises(ValueError, match="vocabulary"):
        CascadeForCausalLM.from_models(small, tiny_model("llama", vocab_size=64))
    with pytest.raises(ValueError, match="outside the range"):
        CascadeForCausalLM.from_models(*tiny_pair("llama"), threshold=2.0)
    small, large = tiny_pair("llama")
    CascadeForCausalLM.from_models(large, small)
    assert "smaller than the small one" in caplog.text


def test_mixed_architectures_save_and_reload_in_process(tmp_path):
    small, _ = tiny_pair("gpt2")  # tied embeddings
    _, large = tiny_pair("qwen2")
    cascade = CascadeForCausalLM.from_models(small, large, rule="chow_sum", threshold=-3.0)
    cascade.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cascade.CascadeForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.config.rule == "chow_sum" and reloaded.generation_config.strategy == "cascade"
    assert reloaded.small.lm_head.weight is reloaded.small.transformer.wte.weight
    for name, tensor in cascade.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    ids, mask = prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(reloaded.generate(ids, **kwargs), cascade.generate(ids, **kwargs))


_RELOAD_SCRIPT = """
import json, math, torch
from transformers import AutoModelForCausalLM
data = json.load(open("inputs.json"))
model = AutoModelForCausalLM.from_pretrained("{folder}", trust_remote_code=True)
assert type(model).__name__ == "CascadeForCausalLM", type(model)
assert "hf_effitrain" not in type(model).__module__, type(model).__module__
ids, mask = torch.tensor(data["ids"]), torch.tensor(data["mask"])
kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
out = {{
    "default": model.generate(ids, **kwargs).tolist(),
    "all": model.generate(ids, threshold=math.inf, **kwargs).tolist(),
    "none": model.generate(ids, threshold=-math.inf, deferral="token", **kwargs).tolist(),
    "share": model.cascade_stats["deferred_share"],
}}
one = dict(attention_mask=mask[1:2], max_new_tokens=6, do_sample=False)
config = model.generation_config
out["speculative_defaults"] = [config.speculative_rule, config.speculative_alpha, config.cascade_draft_len]
out["speculative_large"] = model.generate(ids[1:2], strategy="speculative_cascade", speculative_rule="chow", speculative_alpha=0.0, **one).tolist()
out["speculative_small"] = model.generate(ids[1:2], strategy="speculative_cascade", speculative_rule="diff", speculative_alpha=1.0, **one).tolist()
out["speculative_stats"] = model.cascade_stats
json.dump(out, open("outputs.json", "w"))
"""


@pytest.mark.parametrize("writer", ["save_pretrained", "export_pretrained"])
def test_reload_without_the_package(tmp_path, writer):
    small, large = tiny_pair("mistral")
    cascade = CascadeForCausalLM.from_models(small, large, threshold=-4.5)
    folder = tmp_path / "ckpt"
    if writer == "save_pretrained":
        cascade.save_pretrained(folder)
    else:
        hf_effitrain.export_pretrained(cascade, folder, model_card={"method": "cascade (test)"})
    assert (folder / "generation_cascade.py").exists() and (folder / "cascade_rules.py").exists()
    ids, mask = prompts()
    (tmp_path / "inputs.json").write_text(json.dumps({"ids": ids.tolist(), "mask": mask.tolist()}))
    run_without_package(_RELOAD_SCRIPT.format(folder=folder), cwd=tmp_path)
    out = json.loads((tmp_path / "outputs.json").read_text())
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out["default"] == cascade.generate(ids, **kwargs).tolist()
    assert out["share"] == 0.0  # stats of the last call, the no-deferral one
    assert out["all"] == large.generate(ids, **kwargs).tolist()
    assert out["none"] == small.generate(ids, **kwargs).tolist()
    one = dict(attention_mask=mask[1:2], max_new_tokens=6, do_sample=False)
    assert out["speculative_defaults"] == [
        SPECULATIVE_DEFAULTS[name] for name in ("speculative_rule", "speculative_alpha", "cascade_draft_len")
    ]
    assert out["speculative_large"] == large.generate(ids[1:2], **one).tolist()
    assert out["speculative_small"] == small.generate(ids[1:2], **one).tolist()
    assert out["speculative_stats"]["small_token_share"] == 1.0 and out["speculative_stats"]["large_forwards"] == 2


def test_forward_is_the_small_model():
    small, large = tiny_pair("llama")
    cascade = CascadeForCausalLM.from_models(small, large)
    ids = prompts()[0]
    out = cascade(input_ids=ids, labels=ids)
    reference = small(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, reference.logits) and torch.equal(out.loss, reference.loss)
