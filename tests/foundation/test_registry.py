"""AutoClass registration: namespaced model types, deferred model classes, checkpoints saved with the earlier types,
and the old import paths of moved names."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_effitrain
from hf_effitrain.hub.configuration_cascade import CascadeConfig
from hf_effitrain.hub.configuration_ode_shared import OdeSharedConfig
from hf_effitrain.hub.modeling_cascade import CascadeForCausalLM
from hf_effitrain.hub.modeling_ode_shared import OdeSharedForCausalLM
from tests.testing_utils import tiny_model

ODE_SIZES = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, num_steps=2
)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def test_import_registers_without_importing_any_modeling_code():
    # `import hf_effitrain` must not pay for `PreTrainedModel` (~2 s): the model classes load on first use.
    # (transformers < 5.24 imports its generation utils with the AutoModel classes themselves, so that is not checked.)
    proc = _python(
        "import sys, hf_effitrain\n"
        "from transformers import AutoConfig\n"
        "assert AutoConfig.for_model('effi_ode_shared').__class__.__name__ == 'OdeSharedConfig'\n"
        "loaded = [m for m in ('transformers.modeling_utils', 'hf_effitrain.hub.modeling_ode_shared',\n"
        "                      'hf_effitrain.hub.modeling_cascade', 'hf_effitrain.hub.generation_effi') if m in sys.modules]\n"
        "print(loaded)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_model_types_are_namespaced_and_build_the_real_classes():
    assert OdeSharedConfig.model_type == "effi_ode_shared" and CascadeConfig.model_type == "effi_cascade"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("effi_ode_shared", **ODE_SIZES))
    assert type(model) is OdeSharedForCausalLM


@pytest.mark.parametrize("kind", ["ode", "cascade"])
def test_checkpoints_saved_with_the_earlier_model_type_still_load(tmp_path, kind):
    if kind == "ode":
        torch.manual_seed(0)
        model, legacy = OdeSharedForCausalLM(OdeSharedConfig(**ODE_SIZES)).eval(), "ode_shared"
    else:
        model, legacy = (
            CascadeForCausalLM.from_models(tiny_model("llama", seed=0), tiny_model("llama", seed=1)).eval(),
            "cascade",
        )
    model.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = legacy  # what the package wrote before its types were namespaced
    config_file.write_text(json.dumps(config))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "old").eval()
    assert isinstance(reloaded, type(model))
    input_ids = torch.randint(3, 64, (1, 7))
    torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits)
    reloaded.save_pretrained(tmp_path / "new")  # re-saving moves the checkpoint to the namespaced type
    assert (
        json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == type(model).config_class.model_type
    )


def test_a_namespaced_type_owned_by_another_package_is_refused():
    proc = _python(
        "from transformers import AutoConfig, PreTrainedConfig\n"
        "class Other(PreTrainedConfig):\n"
        "    model_type = 'effi_cascade'\n"
        "AutoConfig.register('effi_cascade', Other)\n"
        "import hf_effitrain\n"
    )
    assert proc.returncode != 0
    assert "model_type 'effi_cascade' is already registered by __main__.Other" in proc.stderr


def test_an_earlier_type_owned_by_another_package_is_left_to_it():
    proc = _python(
        "from transformers import AutoConfig, PreTrainedConfig\n"
        "class Other(PreTrainedConfig):\n"
        "    model_type = 'cascade'\n"
        "AutoConfig.register('cascade', Other)\n"
        "import hf_effitrain\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "print(CONFIG_MAPPING['cascade'].__module__, CONFIG_MAPPING['effi_cascade'].__name__)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["__main__", "CascadeConfig"]


def test_registration_is_idempotent():
    hf_effitrain.register_auto_classes()
    assert AutoConfig.for_model("effi_cascade").__class__ is CascadeConfig


@pytest.mark.parametrize(
    ("old_module", "name", "new_module"),
    [
        ("hf_effitrain.ops", "logit_transform", "hf_effitrain.integrations.lm_head"),
        ("hf_effitrain.cascade", "cascade_aware_loss", "hf_effitrain.methods.cascade"),
        ("hf_effitrain.models.ode_init", "ode_shared_from_llama", "hf_effitrain.methods.ode.conversion"),
        ("hf_effitrain.kernel_mapping", "kernelize_model", "hf_effitrain.integrations.kernel_mapping"),
    ],
)
def test_moved_names_still_import_from_their_old_path_with_a_warning(old_module, name, new_module):
    import importlib

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = getattr(importlib.import_module(old_module), name)
    assert old is getattr(importlib.import_module(new_module), name)
    assert any(issubclass(w.category, FutureWarning) and f"{new_module}.{name}" in str(w.message) for w in caught)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        importlib.import_module(old_module).not_a_name
