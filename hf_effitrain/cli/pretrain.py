"""`effitrain pretrain`: pre-train a causal LM on a corpus (every `TrainingArguments` field is an option)."""

from __future__ import annotations

import json
import logging

from transformers import HfArgumentParser

from hf_effitrain.methods.patch.job import PretrainArguments, run_pretrain, training_arguments_class


def main(argv: list[str]) -> int:
    parser = HfArgumentParser((PretrainArguments, training_arguments_class()), prog="effitrain pretrain")
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_pretrain(args, training_args)
    print(json.dumps(summary, indent=2, default=str))
    return 0
