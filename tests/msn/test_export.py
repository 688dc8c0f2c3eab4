"""Jacobi / TR-Jacobi stay exact after `export_pretrained` + reload with `trust_remote_code=True` without the package."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from hf_effitrain import export_pretrained
from hf_effitrain.hub.generation_jacobi import add_strategy_defaults
from tests.testing_utils import ARCHITECTURES, run_without_package, tiny_model

PROMPTS = [[1, 5, 7, 9, 11, 3], [4, 4, 8, 15, 16, 23, 42, 4, 8]]
NEW_TOKENS = 24

CHILD = """
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoConfig

report = {}
for arch, path in json.load(open("dirs.json")).items():
    expected = load_file(f"{path}/expected.safetensors")
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    stock_class = type(model).__mro__[2]  # Effi<Class> -> (EffiGenerationMixin, <stock class>)
    stock = stock_class.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    for i in range(len(expected) // 2):
        ids, greedy = expected[f"ids{i}"], expected[f"greedy{i}"]
        for strategy in ("jacobi", "tr_jacobi"):
            out = model.generate(ids, strategy=strategy, max_new_tokens=%d, pad_token_id=0, return_dict_in_generate=True)
            via_folder = stock.generate(ids, custom_generate=path, trust_remote_code=True, strategy=strategy,
                                        max_new_tokens=%d, pad_token_id=0)
            rows.append([strategy, torch.equal(out.sequences, greedy), torch.equal(via_folder, greedy), out.num_forwards])
    report[arch] = {"rows": rows, "module": type(model).__module__, "tree_top_k": model.generation_config.tree_top_k,
                    "has_package": "hf_effitrain" in sys.modules}
print(json.dumps(report))
""" % (NEW_TOKENS, NEW_TOKENS)


def test_msn_strategies_exact_after_export_and_reload_without_package(tmp_path):
    dirs = {}
    for architecture in ARCHITECTURES:
        model = tiny_model(architecture)
        add_strategy_defaults(model.generation_config)
        model.generation_config.tree_top_k = 4  # a checkpoint's own strategy parameters travel with it
        tensors = {}
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([prompt])
            tensors[f"ids{i}"] = ids
            tensors[f"greedy{i}"] = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
        path = export_pretrained(model, tmp_path / architecture)
        save_file(tensors, str(path / "expected.safetensors"))
        dirs[architecture] = str(path)
    (tmp_path / "dirs.json").write_text(json.dumps(dirs))
    proc = run_without_package(CHILD, cwd=tmp_path)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == set(ARCHITECTURES)
    for architecture, result in report.items():
        assert not result["has_package"] and result["tree_top_k"] == 4
        assert "transformers_modules" in result["module"]
        for strategy, exact, exact_via_folder, forwards in result["rows"]:
            assert exact and exact_via_folder, (architecture, strategy)
            assert 1 <= forwards <= NEW_TOKENS
