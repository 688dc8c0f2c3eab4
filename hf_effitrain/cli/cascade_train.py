"""`effitrain cascade-train`: fine-tune a cascade's small model with the cascade-aware loss, given a large model.

Every `CascadeAwareTrainingArguments` field (all of `TrainingArguments` plus `--cascade_preset`,
`--weight_both_wrong`, `--kd_weight`, `--precompute_large_predictions`, ...) is an option.
"""

from __future__ import annotations

import json
import logging

from transformers import HfArgumentParser

from ..cascade.runs import CascadeDataArguments, CascadeModelArguments, run_cascade_train
from ..training.cascade_config import CascadeAwareTrainingArguments


def main(argv: list[str]) -> int:
    parser = HfArgumentParser(
        (CascadeModelArguments, CascadeDataArguments, CascadeAwareTrainingArguments), prog="effitrain cascade-train"
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_cascade_train(model_args, data_args, training_args), indent=2, default=str))
    return 0
