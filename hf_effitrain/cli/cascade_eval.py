"""`effitrain cascade-eval`: deferral curve (quality vs deferral ratio and relative FLOPs) of a small -> large cascade."""

from __future__ import annotations

import json
import logging

from transformers import HfArgumentParser

from hf_effitrain.methods.cascade.job import (
    CascadeDataArguments,
    CascadeEvalArguments,
    CascadeModelArguments,
    run_cascade_eval,
)


def main(argv: list[str]) -> int:
    parser = HfArgumentParser(
        (CascadeModelArguments, CascadeDataArguments, CascadeEvalArguments), prog="effitrain cascade-eval"
    )
    model_args, data_args, eval_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_cascade_eval(model_args, data_args, eval_args), indent=2, default=str))
    return 0
