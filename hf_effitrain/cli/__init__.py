"""`effitrain` console script: one subcommand per module, each module exposing `main(argv) -> int`.

Subcommands are imported only when run, so `effitrain --help` stays fast and one method's import error does not
break the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("hf_effitrain.cli.pretrain", "pre-train a causal LM (token- or patch-level) with the stock Trainer"),
    "generate": (
        "hf_effitrain.cli.generate",
        "complete a prompt with a checkpoint, optionally with a decoding strategy",
    ),
    "push": ("hf_effitrain.cli.push", "upload an exported checkpoint to the Hugging Face Hub"),
    "demo": ("hf_effitrain.cli.demo", "train, export, reload and sample a small model on this machine's Python source"),
    "sft": ("hf_effitrain.cli.sft", "supervised fine-tuning, optionally with Make-Some-Noise input corruption"),
    "cascade-train": ("hf_effitrain.cli.cascade_train", "cascade-aware training of a cascade's small model"),
    "cascade-eval": ("hf_effitrain.cli.cascade_eval", "deferral curves of a small -> large cascade"),
    "recipe": (
        "hf_effitrain.cli.recipe",
        "patch pre-training -> MSN -> cascade-aware training -> exports, in one resumable run",
    ),
}


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effitrain", description="hf_effitrain command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: `effitrain COMMAND [options]`; `effitrain COMMAND --help` shows the command's options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_level_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(SUBCOMMANDS)}")
    module = importlib.import_module(SUBCOMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    finally:
        _end_distributed()


def _end_distributed() -> None:
    """Tear down a process group the command started (`torchrun` / `accelerate launch`): a live gloo or NCCL group
    at interpreter exit can abort the process after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def console_main() -> int:
    """The `effitrain` console script: `main`, with a bad value reported as one error line (exit status 2).

    Options are checked where they are defined (dataclass `__post_init__`, config and trainer constructors) and
    raise `ValueError` naming the value and what is allowed; a user needs that line, not a traceback through
    `HfArgumentParser`. `EFFITRAIN_TRACEBACK=1` re-raises for debugging. Other exceptions keep their traceback.
    """
    try:
        return main()
    except ValueError as error:
        if os.environ.get("EFFITRAIN_TRACEBACK") == "1":
            raise
        command = sys.argv[1] if len(sys.argv) > 1 else ""
        print(f"effitrain {command}: error: {error} (EFFITRAIN_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
