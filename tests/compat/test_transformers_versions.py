"""Exports made with this environment's transformers load and decode exactly on the oldest and newest supported ones.

The code inside a checkpoint runs on its user's transformers. Each supported end of the range gets the same check in
a process where hf_effitrain cannot be imported: the running interpreter (the newest release in CI) and a plain
virtual environment with the oldest supported release (torch + transformers + safetensors only). For every export
(stock Llama / Qwen2 / Mistral / GPT-2, the ODE-shared model, a cascade) the reloaded model's logits and greedy
output equal the exporting process's, and every strategy equals greedy decoding token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_effitrain import CascadeForCausalLM, OdeSharedConfig, OdeSharedForCausalLM, export_pretrained
from hf_effitrain.hub.transformers_compat import TESTED_TRANSFORMERS
from tests.compat.plain_env import current_python, plain_python, run_checks
from tests.testing_utils import ARCHITECTURES, tiny_model

CHECKS_SCRIPT = Path(__file__).resolve().parent / "checkpoint_checks.py"
NEW_TOKENS = 8  # as in checkpoint_checks.py
ODE_STEPS = (4, 2)
PROMPT = torch.tensor([[1, 5, 7, 9, 11, 3, 17]])


def _greedy(model, **kwargs) -> torch.Tensor:
    return model.generate(
        PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs
    )


def _logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT, **kwargs).logits.contiguous()


def _stock_job(root: Path, architecture: str) -> dict:
    model = tiny_model(architecture)
    export_dir = export_pretrained(model, root / architecture)
    expected = root / f"{architecture}.safetensors"
    save_file({"ids": PROMPT, "logits": _logits(model), "greedy": _greedy(model)}, str(expected))
    return {"kind": "stock", "name": architecture, "export_dir": str(export_dir), "expected_file": str(expected)}


def _ode_job(root: Path) -> dict:
    torch.manual_seed(0)
    config = OdeSharedConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_steps=4,
        num_pre_layers=1,
        max_position_embeddings=256,
    )
    model = OdeSharedForCausalLM(config).float().eval()
    export_dir = export_pretrained(model, root / "ode")
    tensors = {"ids": PROMPT}
    for steps in ODE_STEPS:
        tensors[f"logits_{steps}"] = _logits(model, num_steps=steps)
        tensors[f"greedy_{steps}"] = _greedy(model, num_steps=steps)
    save_file(tensors, str(root / "ode.safetensors"))
    return {
        "kind": "ode",
        "name": "ode_shared",
        "export_dir": str(export_dir),
        "expected_file": str(root / "ode.safetensors"),
        "num_steps": list(ODE_STEPS),
    }


def _cascade_job(root: Path) -> dict:
    small = tiny_model("llama", seed=0)
    large = tiny_model("llama", seed=1, hidden_size=64, intermediate_size=128)
    cascade = CascadeForCausalLM.from_models(small, large)
    export_dir = export_pretrained(cascade, root / "cascade")
    save_file(
        {"ids": PROMPT, "greedy_small": _greedy(small), "greedy_large": _greedy(large)},
        str(root / "cascade.safetensors"),
    )
    return {
        "kind": "cascade",
        "name": "cascade",
        "export_dir": str(export_dir),
        "expected_file": str(root / "cascade.safetensors"),
    }


@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exports")
    jobs = [_stock_job(root, architecture) for architecture in ARCHITECTURES] + [_ode_job(root), _cascade_job(root)]
    path = root / "jobs.json"
    path.write_text(json.dumps(jobs), encoding="utf-8")
    return path


def _reports(python, jobs_file: Path) -> list[dict]:
    proc = run_checks(python, CHECKS_SCRIPT, jobs_file, cwd=jobs_file.parent)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :])


def _assert_all_exact(reports: list[dict], jobs_file: Path, version: str) -> None:
    jobs = json.loads(jobs_file.read_text(encoding="utf-8"))
    assert len(reports) == len(jobs)
    for job, report in zip(jobs, reports):
        assert "error" not in report, (job["name"], report)
        assert report["transformers"] == version, report
        checks = {key: value for key, value in report.items() if isinstance(value, bool)}
        assert checks and all(checks.values()), (job["name"], report)


@pytest.mark.parametrize("end", ["newest", "oldest"])
def test_exports_load_and_decode_exactly_without_the_package(end, jobs_file):
    if end == "newest":
        import transformers

        python, version = current_python(), transformers.__version__
    else:
        version = TESTED_TRANSFORMERS[0]
        python = plain_python(version)
    _assert_all_exact(_reports(python, jobs_file), jobs_file, version)
