"""Upload the checkout's kernel repositories (`kernels/<name>/`) to the Hugging Face Hub.

Each kernel repo goes to a Hub repo of type `kernel` (the only type `kernels` >= 0.14 loads), on `main` and on the
version branch `v<version>` from its `build.toml`, which is what `get_kernel(repo_id, version=...)` resolves. The
`CARD.md` is also uploaded as `README.md`. A stale `build/` (out of date with `torch-ext/`) is refused: rebuild with
`python scripts/build_kernels.py`. `--dry-run` lists what would be uploaded and contacts nobody. This is checkout
tooling (a wheel does not ship `kernels/`), so it is a script and not an `effitrain` command.

    python scripts/push_kernels.py --repo-id my-org            # every kernel repo -> my-org/<kernel name>
    python scripts/push_kernels.py --repo-id my-org/my-lce --kernel effi_linear_cross_entropy --dry-run
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel_build import CHECKOUT_KERNELS_DIR, build_repo, kernel_repos, read_build_config
from transformers import HfArgumentParser

from hf_effitrain.ops.kernel_loading import KERNEL_NAMES

__all__ = ["PushKernelsArguments", "main", "push_kernel_repo", "upload_plan"]

_IGNORE = ("__pycache__", "*.pyc", ".pytest_cache")


@dataclass
class PushKernelsArguments:
    """Options of `scripts/push_kernels.py`."""

    repo_id: str = field(
        metadata={
            "help": "A Hub namespace (user or org): every kernel repo goes to <namespace>/<kernel name from "
            "build.toml>. Or a full 'namespace/name' together with --kernel to push one kernel repo there."
        }
    )
    kernel: str | None = field(
        default=None, metadata={"help": f"Push only this kernel repo, one of {KERNEL_NAMES}; default: all."}
    )
    kernels_dir: str | None = field(
        default=None,
        metadata={
            "help": f"Folder holding the kernel repos; default: {CHECKOUT_KERNELS_DIR} (this checkout's kernels/)."
        },
    )
    private: bool = field(default=False, metadata={"help": "Create the Hub repos as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token; default: the logged-in token."})
    dry_run: bool = field(default=False, metadata={"help": "List what would be uploaded where; upload nothing."})

    def __post_init__(self):
        if self.kernel is not None and self.kernel not in KERNEL_NAMES:
            raise ValueError(f"--kernel must be one of {KERNEL_NAMES}, got {self.kernel!r}")
        parts = self.repo_id.split("/")
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"--repo-id must be 'namespace' or 'namespace/name', got {self.repo_id!r}")
        if len(parts) == 2 and self.kernel is None:
            raise ValueError(f"--repo-id {self.repo_id!r} names one repo: also give --kernel (one of {KERNEL_NAMES})")


def _staged_files(repo: Path) -> list[str]:
    files = [
        str(path.relative_to(repo))
        for path in sorted(repo.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]
    return files + (["README.md"] if (repo / "CARD.md").is_file() and "README.md" not in files else [])


def upload_plan(args: PushKernelsArguments) -> list[dict]:
    """One entry per kernel repo to push: local path, Hub repo id, branches and files.

    Args:
        args (`PushKernelsArguments`): the parsed options.

    Returns:
        `list[dict]`: per kernel repo, `path` (`Path`), `repo_id` (`str`), `branches` and `files` (`list[str]`).

    Raises:
        `ValueError`: no kernel repo matches, or a repo's `build/` is out of date with its `torch-ext/`.
    """
    kernels_dir = Path(args.kernels_dir) if args.kernels_dir else CHECKOUT_KERNELS_DIR
    repos = [repo for repo in kernel_repos(kernels_dir) if args.kernel in (None, repo.name)]
    if not repos:
        raise ValueError(
            f"no kernel repo {args.kernel or ''} (a folder with build.toml) under {str(kernels_dir)!r}; valid kernels are "
            f"{list(KERNEL_NAMES)} under a checkout's kernels/ folder (--kernels_dir)."
        )
    plan = []
    for repo in repos:
        general = read_build_config(repo)["general"]
        if not build_repo(repo, check=True):
            raise ValueError(f"{repo}/build is out of date with torch-ext/; run python scripts/build_kernels.py")
        repo_id = args.repo_id if "/" in args.repo_id else f"{args.repo_id}/{general['name']}"
        branches = ["main", f"v{general['version']}"]
        plan.append({"path": repo, "repo_id": repo_id, "branches": branches, "files": _staged_files(repo)})
    return plan


def push_kernel_repo(entry: dict, private: bool = False, token: str | None = None, api: Any = None) -> None:
    """Create the `kernel`-type Hub repo and upload the kernel repo to each branch of `entry`.

    Args:
        entry (`dict`): one entry of `upload_plan`.
        private (`bool`, *optional*, defaults to `False`): create the Hub repo as private.
        token (`str`, *optional*): Hub token; defaults to the logged-in one.
        api (`huggingface_hub.HfApi`, *optional*): the client to call; defaults to `HfApi(token=token)`.
    """
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    api.create_repo(entry["repo_id"], repo_type="kernel", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        folder = Path(staging) / entry["path"].name
        shutil.copytree(entry["path"], folder, ignore=shutil.ignore_patterns(*_IGNORE))
        if (folder / "CARD.md").is_file() and not (folder / "README.md").exists():
            shutil.copy(folder / "CARD.md", folder / "README.md")
        for branch in entry["branches"]:
            if branch != "main":
                api.create_branch(entry["repo_id"], branch=branch, repo_type="kernel", exist_ok=True)
            api.upload_folder(
                repo_id=entry["repo_id"],
                folder_path=folder,
                repo_type="kernel",
                revision=branch,
                commit_message=f"Upload {entry['path'].name} from hf_effitrain",
            )


def main(argv: list[str] | None = None) -> int:
    """Push (or with `--dry-run` list) the kernel repos; a bad option or a stale build exits 2 with one error line.

    Args:
        argv (`list[str]`, *optional*): the options; defaults to `sys.argv[1:]`.

    Returns:
        `int`: the exit status, 0.
    """
    parser = HfArgumentParser(PushKernelsArguments, prog="push_kernels.py", description=__doc__.splitlines()[0])
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        plan = upload_plan(args)
    except ValueError as error:  # the refusals above name the bad value; a traceback would only hide it
        parser.error(str(error))
    for entry in plan:
        where = f"{entry['repo_id']} (type kernel; branches {', '.join(entry['branches'])})"
        if args.dry_run:
            print(f"[dry-run] {entry['path']} -> {where}: {len(entry['files'])} files")
            for name in entry["files"]:
                print(f"  {name}")
            continue
        push_kernel_repo(entry, private=args.private, token=args.token)
        print(f"pushed {entry['path']} -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
