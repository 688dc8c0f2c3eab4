"""`effitrain push`: upload an exported checkpoint folder to the Hugging Face Hub (or show what would go up)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_effitrain.push import push_checkpoint

__all__ = ["PushArguments", "main"]


@dataclass
class PushArguments:
    """Options of `effitrain push`. The Hub token comes from `hf auth login` or the `HF_TOKEN` variable."""

    checkpoint: str = field(metadata={"help": "Folder written by export_pretrained (or `effitrain demo`)."})
    repo_id: str = field(
        metadata={"help": "Target model repo, 'ORG/NAME' (or 'NAME' in your namespace); created if missing."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repo private."})
    dry_run: bool = field(default=False, metadata={"help": "Print the file list and the model card; upload nothing."})
    commit_message: str | None = field(
        default=None, metadata={"help": "Commit message (default: 'Upload hf_effitrain checkpoint')."}
    )


def main(argv: list[str]) -> int:
    """`effitrain push --checkpoint DIR --repo-id ORG/NAME [--private] [--dry-run]`."""
    parser = HfArgumentParser(PushArguments, prog="effitrain push", description=__doc__)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        info = push_checkpoint(
            args.checkpoint,
            args.repo_id,
            private=args.private,
            dry_run=args.dry_run,
            commit_message=args.commit_message,
        )
    except ValueError as error:  # bad folder or repo id: a usage error, not a crash
        parser.error(str(error))
    if info is not None:
        print(f"Pushed {args.checkpoint} to {info.commit_url}")
    return 0
