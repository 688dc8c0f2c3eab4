"""`effitrain cascade-train`: fine-tune a cascade's small model with the cascade-aware loss, given a large model.

Every `CascadeAwareTrainingArguments` field (all of `TrainingArguments` plus `--cascade_preset`,
`--weight_both_wrong`, `--kd_weight`, `--precompute_large_predictions`, ...) is an option; the cascade is exported
Hub-ready (model card, `custom_generate/`) to `--export_dir` (default `<output_dir>/cascade`).
"""

from __future__ import annotations

import json
import logging

from transformers import HfArgumentParser

from hf_effitrain.methods.cascade.config import CascadeAwareTrainingArguments
from hf_effitrain.methods.cascade.job import (
    CascadeDataArguments,
    CascadeExportArguments,
    CascadeModelArguments,
    run_cascade_train,
)


def main(argv: list[str]) -> int:
    parser = HfArgumentParser(
        (CascadeModelArguments, CascadeDataArguments, CascadeAwareTrainingArguments, CascadeExportArguments),
        prog="effitrain cascade-train",
    )
    model_args, data_args, training_args, export_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(
        json.dumps(
            run_cascade_train(model_args, data_args, training_args, export_args=export_args), indent=2, default=str
        )
    )
    return 0
