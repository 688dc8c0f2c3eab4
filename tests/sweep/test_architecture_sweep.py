"""Every causal-LM model type of the installed transformers, tiny and random: decoding exact or clearly refused,
the export round trip exact, the K=1 patch loss equal to the model's own loss or clearly refused.

`CI_SAMPLE` (19 types, chosen for the conventions they exercise) runs in CI; the full sweep over
`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is slow (EFFI_RUN_SLOW=1; `scripts/sweep_architectures.py` writes its JSON).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parent))

from expectations import EXPECTED, NOT_BUILT  # noqa: E402
from sweep_checks import FEATURES, PROMPT, check_type, outcome_kind  # noqa: E402
from tiny_configs import tiny_causal_lm  # noqa: E402

from hf_effitrain import export_pretrained  # noqa: E402
from tests.testing_utils import run_without_package  # noqa: E402

CI_SAMPLE = (
    "gpt_neox",  # class-specific checkpoint conversion (lm_head <- embed_out)
    "falcon_h1",  # non-persistent buffers rebuilt at load; hybrid SSM (decoding refused)
    "mixtral",  # MoE expert fusion by the model-type conversion mapping
    "minicpm3",  # hidden states divided by logits_scaling before the head
    "granite",  # logits divided by logits_scaling after the head
    "cohere",  # logits multiplied by logit_scale
    "gemma2",  # final_logit_softcapping
    "recurrent_gemma",  # logits_soft_cap; recurrent state (decoding refused)
    "roberta",  # position ids from padding_idx + 1, as a decoder
    "openai-gpt",  # no KV cache (decoding refused)
    "xlm",  # its own cache dict; bidirectional by default (patch loss refused)
    "mamba",  # stateful SSM (decoding refused)
    "qwen3_next",  # hybrid linear attention (decoding refused)
    "mpt",  # config default use_cache=False (decoded with the cache on); no position_ids (tr_jacobi refused)
    "cpmant",  # embedding table larger than the vocabulary
    "mllama",  # embedding table larger than the vocabulary
    "prophetnet",  # n-gram streams (decoding and patch loss refused)
    "bart",  # decoder-only use of an encoder-decoder family; unshifted `labels` loss
    "gpt_bigcode",  # multi-query attention cache
)


def assert_expected(result: dict) -> None:
    """Every feature exact, except the refusals listed in `EXPECTED`, which must be refusals naming the reason."""
    model_type = result["model_type"]
    if result["build"] != "ok":
        assert model_type in NOT_BUILT, (
            f"{model_type}: {result['build']} (add a TYPE_TWEAKS entry or list it in NOT_BUILT)"
        )
        pytest.skip(f"{model_type}: no tiny model ({NOT_BUILT[model_type]})")
    expected = EXPECTED.get(model_type, {})
    problems = []
    for feature in FEATURES:
        outcome = result[feature]
        if feature in expected:
            needles = expected[feature]
            if outcome_kind(outcome) != "refused" or not any(needle in outcome for needle in needles):
                wanted = " or ".join(repr(needle) for needle in needles)
                problems.append(f"{feature}: expected a refusal mentioning {wanted}, got {outcome}")
        elif outcome != "exact":
            problems.append(f"{feature}: {outcome}")
    assert not problems, f"{model_type}: " + "; ".join(problems)


@pytest.mark.parametrize("model_type", [t for t in CI_SAMPLE if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES])
def test_architecture_sample(model_type):
    assert_expected(check_type(model_type))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_architecture_full_sweep(model_type):
    assert_expected(check_type(model_type))


# Exports whose weights transformers converts at load (the remote class must keep that), checked where the package
# is not installed: logits and greedy output equal to the exporting process's.
PACKAGE_FREE_TYPES = ("gpt_neox", "falcon_h1", "mixtral")
CHILD = """
import json, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
report = {}
for model_type, folder in FOLDERS.items():
    expected = load_file(folder + ".expected.safetensors")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    greedy = model.generate(expected["ids"], max_new_tokens=8, do_sample=False, pad_token_id=0)
    report[model_type] = [type(model).__name__, torch.equal(logits, expected["logits"]), torch.equal(greedy, expected["greedy"])]
print("REPORT" + json.dumps(report))
"""


def test_converted_exports_reload_exactly_without_the_package(tmp_path):
    folders = {}
    for model_type in PACKAGE_FREE_TYPES:
        model = tiny_causal_lm(model_type)
        folder = export_pretrained(model, tmp_path / model_type)
        ids = torch.tensor(PROMPT)
        with torch.no_grad():
            logits = model(ids).logits
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        save_file({"ids": ids, "logits": logits.contiguous(), "greedy": greedy}, f"{folder}.expected.safetensors")
        folders[model_type] = str(folder)
    proc = run_without_package(CHILD.replace("FOLDERS", repr(folders)), cwd=tmp_path)
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT"))[len("REPORT") :])
    for model_type in PACKAGE_FREE_TYPES:
        name, logits_equal, greedy_equal = report[model_type]
        assert name.startswith("Effi") and logits_equal and greedy_equal, (model_type, report[model_type])
