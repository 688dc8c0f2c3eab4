"""Publish an exported checkpoint folder to the Hugging Face Hub in one commit.

`push_checkpoint` uploads what `export_pretrained` wrote: it checks the folder first (safetensors weights, config.json,
no pickled files), fills the model card's checkpoint placeholder with the repo id, and sends everything through
`HfApi.create_repo(exist_ok=True)` + `HfApi.create_commit`, the same two calls transformers' `push_to_hub` makes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.utils import validate_repo_id

from .export import CARD_REPO_PLACEHOLDER, require_safetensors

logger = logging.getLogger(__name__)

__all__ = ["checkpoint_files", "push_checkpoint"]

# Training-state pickles a Trainer checkpoint also holds: loading them unpickles arbitrary code, so they never go out.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def checkpoint_files(checkpoint_dir: str | Path) -> list[Path]:
    """The files `push_checkpoint` would upload, relative to `checkpoint_dir`, after validating the folder.

    Hidden entries and `__pycache__` folders are left out (logged); everything else in the folder is part of the
    checkpoint.

    Raises:
        ValueError: no `*.safetensors` weights, no config.json, or pickled files in the folder.
    """
    root = require_safetensors(checkpoint_dir)
    if not (root / "config.json").is_file():
        raise ValueError(
            f"Checkpoint directory {str(root)!r} has no config.json; export it with `hf_effitrain.export_pretrained`."
        )
    files, skipped = [], []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            skipped.append(relative)
        elif path.is_file():
            files.append(relative)
    if skipped:
        logger.info("Not uploading hidden / cache entries of %s: %s", root, [str(p) for p in skipped])
    pickles = [str(p) for p in files if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(
            f"Checkpoint directory {str(root)!r} holds pickled files {pickles}; publish only safetensors checkpoints: "
            "export the model with `hf_effitrain.export_pretrained(model, new_dir)` and push that folder."
        )
    return files


def _card_for(root: Path, repo_id: str) -> str | None:
    card_path = root / "README.md"
    if not card_path.is_file():
        return None
    return card_path.read_text(encoding="utf-8").replace(CARD_REPO_PLACEHOLDER, repo_id)


def push_checkpoint(
    checkpoint_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> CommitInfo | None:
    """Upload an exported checkpoint folder to the model repo `repo_id` in a single commit.

    Args:
        checkpoint_dir (`str` or `Path`): a folder written by `export_pretrained`.
        repo_id (`str`): `"org/name"` or `"name"` (your namespace); the repo is created if missing.
        private (`bool`, defaults to `False`): create the repo private (an existing repo keeps its visibility).
        dry_run (`bool`, defaults to `False`): print the file list and the model card, upload nothing.
        token (`str`, *optional*): Hub token; defaults to the logged-in one (`hf auth login` / `HF_TOKEN`).
        commit_message (`str`, *optional*): defaults to "Upload hf_effitrain checkpoint".
    Returns:
        The `CommitInfo` of the upload, or None for a dry run.
    Raises:
        ValueError: an invalid `repo_id` or checkpoint folder (see `checkpoint_files`).
    """
    validate_repo_id(repo_id)  # HFValidationError is a ValueError naming the bad id
    root = Path(checkpoint_dir)
    files = checkpoint_files(root)
    card = _card_for(root, repo_id)
    if card is None:
        logger.warning("%s has no README.md model card; the repo will have none.", root)
    if dry_run:
        total = sum((root / f).stat().st_size for f in files)
        print(
            f"Dry run: would upload {len(files)} files ({total:,} bytes) from {root} to https://huggingface.co/{repo_id}"
        )
        for relative in files:
            print(f"  {relative.as_posix()}  ({(root / relative).stat().st_size:,} bytes)")
        print("\n--- README.md ---\n" + (card if card is not None else "(no model card)"))
        return None
    operations = [
        CommitOperationAdd(
            path_in_repo=relative.as_posix(),
            path_or_fileobj=card.encode("utf-8")
            if relative.as_posix() == "README.md" and card is not None
            else str(root / relative),
        )
        for relative in files
    ]
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.create_commit(
        repo_id, operations, commit_message=commit_message or "Upload hf_effitrain checkpoint", repo_type="model"
    )
    logger.info("Pushed %d files from %s to %s", len(files), root, repo_id)
    return info
