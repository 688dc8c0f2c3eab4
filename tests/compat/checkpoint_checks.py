"""Checks an exported checkpoint in a Python where hf_effitrain is not installed (run as a script, not collected).

`python checkpoint_checks.py jobs.json` loads each job's export with `trust_remote_code=True` (and, for stock
architectures, as the stock class plus `custom_generate=`), compares its logits and greedy output with what the
exporting process recorded, and checks that every decoding strategy of the checkpoint equals greedy decoding token
for token. It prints one line `REPORT <json>` with a list of per-job dicts of named booleans / values, and imports
only torch, transformers and safetensors: it runs in plain environments with another transformers release.
"""

from __future__ import annotations

import json
import math
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

NEW_TOKENS = 8


def _greedy(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(
        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs
    )


def _logits_match(model, ids: torch.Tensor, expected: torch.Tensor, **kwargs) -> bool:
    with torch.no_grad():
        logits = model(ids, **kwargs).logits
    return bool(torch.allclose(logits, expected, rtol=1e-5, atol=1e-5))


def check_stock(job: dict, expected: dict) -> dict:
    """A stock architecture: remote class, stock class, and `custom_generate=` on the stock class."""
    ids, report = expected["ids"], {}
    remote = AutoModelForCausalLM.from_pretrained(job["export_dir"], trust_remote_code=True).eval()
    report["remote_class"] = type(remote).__name__
    report["remote_logits"] = _logits_match(remote, ids, expected["logits"])
    greedy = _greedy(remote, ids)
    report["remote_greedy"] = torch.equal(greedy, expected["greedy"])
    for strategy in ("jacobi", "tr_jacobi"):
        report[f"remote_{strategy}"] = torch.equal(_greedy(remote, ids, strategy=strategy), greedy)
    stock = AutoModelForCausalLM.from_pretrained(job["export_dir"]).eval()
    report["stock_class"] = type(stock).__name__
    report["stock_logits"] = _logits_match(stock, ids, expected["logits"])
    custom = dict(custom_generate=job["export_dir"], trust_remote_code=True)
    report["custom_tr_jacobi"] = torch.equal(_greedy(stock, ids, strategy="tr_jacobi", **custom), greedy)
    return report


def check_ode(job: dict, expected: dict) -> dict:
    """The package's ODE-shared model: logits and cached greedy at several step counts, and a strategy on top."""
    ids, report = expected["ids"], {}
    model = AutoModelForCausalLM.from_pretrained(job["export_dir"], trust_remote_code=True).eval()
    report["remote_class"] = type(model).__name__
    for steps in job["num_steps"]:
        report[f"logits_{steps}"] = _logits_match(model, ids, expected[f"logits_{steps}"], num_steps=steps)
        greedy = _greedy(model, ids, num_steps=steps)
        report[f"greedy_{steps}"] = torch.equal(greedy, expected[f"greedy_{steps}"])
        report[f"jacobi_{steps}"] = torch.equal(_greedy(model, ids, num_steps=steps, strategy="jacobi"), greedy)
    return report


def check_cascade(job: dict, expected: dict) -> dict:
    """The package's cascade: deferring everything / nothing equals the large / small member's greedy output."""
    ids, report = expected["ids"], {}
    model = AutoModelForCausalLM.from_pretrained(job["export_dir"], trust_remote_code=True).eval()
    report["remote_class"] = type(model).__name__
    for deferral in ("sequence", "token"):
        for name, threshold in (("large", math.inf), ("small", -math.inf)):
            out = _greedy(model, ids, strategy="cascade", deferral=deferral, threshold=threshold)
            report[f"{deferral}_{name}"] = torch.equal(out, expected[f"greedy_{name}"])
    return report


CHECKS = {"stock": check_stock, "ode": check_ode, "cascade": check_cascade}


def main(jobs_file: str) -> None:
    torch.manual_seed(0)
    jobs = json.loads(open(jobs_file, encoding="utf-8").read())
    reports = []
    for job in jobs:
        report = {"kind": job["kind"], "transformers": transformers.__version__}
        try:
            report.update(CHECKS[job["kind"]](job, load_file(job["expected_file"])))
        except Exception as error:  # reported per job, so that one failure does not hide the others
            report["error"] = f"{type(error).__name__}: {error}"
        reports.append(report)
    print("REPORT " + json.dumps(reports))


if __name__ == "__main__":
    main(sys.argv[1])
