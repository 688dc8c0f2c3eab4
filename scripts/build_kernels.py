"""Build the noarch variants of every kernel repo under `kernels/` (see `kernel_build.py`).

python scripts/build_kernels.py            # (re)build every kernel repo
python scripts/build_kernels.py --check    # exit 1 if a build/ folder is out of date with torch-ext/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kernel_build import CHECKOUT_KERNELS_DIR, build_repo, kernel_repos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that build/ matches torch-ext/")
    parser.add_argument(
        "--kernels-dir", type=Path, default=CHECKOUT_KERNELS_DIR, help="folder with one kernel repo per op"
    )
    args = parser.parse_args(argv)
    repos = kernel_repos(args.kernels_dir)
    if not repos:
        parser.error(f"no kernel repo (a folder with build.toml) under {args.kernels_dir}")
    stale = [repo.name for repo in repos if not build_repo(repo, check=args.check)]
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/build_kernels.py", file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'built'} {len(repos)} kernel repos: {', '.join(r.name for r in repos)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
