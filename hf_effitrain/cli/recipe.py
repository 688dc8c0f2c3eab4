"""`effitrain recipe`: the four methods in one resumable pipeline (see `hf_effitrain.training.recipe`)."""

from __future__ import annotations

import json
import logging

from transformers import HfArgumentParser

from hf_effitrain.training.recipe import RecipeArguments, run_recipe


def main(argv: list[str]) -> int:
    (args,) = HfArgumentParser(RecipeArguments, prog="effitrain recipe").parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_recipe(args)
    print(json.dumps({key: summary[key] for key in ("arguments", "settings")}, indent=2, default=str))
    print(summary["table"])
    print(
        f"Summary written to {args.output_dir}/summary.json; exports in {args.output_dir}/export/small and export/cascade"
    )
    return 0
