"""Checks of exported checkpoints in a process where hf_effitrain cannot be imported (see `test_export`).

`python export_checks.py jobs.json` loads each job's export with `trust_remote_code=True` (and, for stock
architectures, through the stock class and transformers' `custom_generate`), compares logits and greedy output with
the exporting process's (`expected_file`), checks that `strategy=` reaches the strategy table of the module copy each
entry point really uses (the `probe` strategy, registered at run time), and prints one `REPORT<json>` line.
"""

import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedTokenizerFast

calls = []


def probe(model, inputs=None, generation_config=None, **kwargs):
    calls.append(sorted(kwargs))
    return GenerationMixin.generate(model, inputs, generation_config=generation_config, **kwargs)


def strategy_table(module_name):
    return sys.modules[module_name.rsplit(".", 1)[0] + ".generation_effi"].STRATEGIES


def check_job(export_dir, expected_file, stock, tokenizer):
    expected = load_file(expected_file)
    ids, report = expected["ids"], {}

    def check(model, tag):
        with torch.no_grad():
            report[tag + "_logits_equal"] = torch.equal(model(ids).logits, expected["logits"])
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        report[tag + "_greedy_equal"] = torch.equal(out, expected["greedy"])

    calls.clear()
    remote = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
    report["remote_class"] = type(remote).__name__
    report["remote_mro"] = [c.__name__ for c in type(remote).__mro__]
    report["draft_len"] = getattr(remote.generation_config, "effi_test_draft_len", None)
    check(remote, "remote")
    strategy_table(type(remote).__module__)["probe"] = probe
    out = remote.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, strategy="probe")
    report["remote_probe_equal"] = torch.equal(out, expected["greedy"])
    report["remote_probe_calls"] = list(calls)
    if stock:  # a real strategy of the package, through the model's own remote code
        out = remote.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, strategy="tr_jacobi")
        report["remote_tr_jacobi_equal"] = torch.equal(out, expected["greedy"])
    try:
        remote.generate(ids, max_new_tokens=2, strategy="no_such_strategy")
    except ValueError as error:
        report["remote_unknown_error"] = str(error)

    if stock:
        calls.clear()
        stock_model = AutoModelForCausalLM.from_pretrained(export_dir)
        report["stock_class"] = type(stock_model).__name__
        check(stock_model, "stock")
        kwargs = dict(
            custom_generate=export_dir,
            trust_remote_code=True,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        report["custom_none_equal"] = torch.equal(stock_model.generate(ids, **kwargs), expected["greedy"])
        report["custom_tr_jacobi_equal"] = torch.equal(
            stock_model.generate(ids, strategy="tr_jacobi", **kwargs), expected["greedy"]
        )
        entry = stock_model.load_custom_generate(export_dir, trust_remote_code=True)
        strategy_table(entry.__module__)["probe"] = probe
        report["custom_probe_equal"] = torch.equal(
            stock_model.generate(ids, strategy="probe", **kwargs), expected["greedy"]
        )
        report["custom_probe_calls"] = list(calls)
        try:
            stock_model.generate(ids, strategy="no_such_strategy", **kwargs)
        except ValueError as error:
            report["custom_unknown_error"] = str(error)

    if tokenizer:
        report["fast_tokenizer_ids"] = PreTrainedTokenizerFast.from_pretrained(export_dir)("t5 t7 t9")["input_ids"]
        try:
            report["auto_tokenizer_ids"] = AutoTokenizer.from_pretrained(export_dir)("t5 t7 t9")["input_ids"]
        except Exception as error:
            report["auto_tokenizer_ids"] = repr(error)
    return report


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    new_tokens = spec["new_tokens"]
    print("REPORT" + json.dumps([check_job(**job) for job in spec["jobs"]]))
