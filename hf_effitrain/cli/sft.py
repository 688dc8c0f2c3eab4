"""`effitrain sft`: supervised fine-tuning with trl, Make-Some-Noise input corruption by default (`run_sft`)."""

from __future__ import annotations

import json
import logging

from transformers import HfArgumentParser

from hf_effitrain.methods.msn.config import NoisySFTConfig
from hf_effitrain.methods.msn.job import SftArguments, run_sft


def main(argv: list[str]) -> int:
    parser = HfArgumentParser((SftArguments, NoisySFTConfig), prog="effitrain sft")
    args, config = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_sft(args, config), indent=2, default=str))
    return 0
