#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels that a GPU machine without one lacks, into `wheelhouse/`.
#
# The GPU machine is assumed to hold Python 3.12 with torch + CUDA, triton, numpy, pandas, pyarrow, transformers
# (an older one), peft and accelerate, but no trl, datasets or kernels and no package index. This script:
#   1. builds this package as a wheel (from the working tree);
#   2. resolves this package + transformers, trl, datasets, kernels (+ liger-kernel, optional) for CPython 3.12 on
#      manylinux x86-64 (`pip install --dry-run --report`, metadata only), as if nothing were installed;
#   3. downloads every resolved wheel except the heavy ones the GPU machine already has (torch and its CUDA wheels,
#      triton, numpy, pandas, pyarrow and torch's own dependencies): about 40 MB instead of several GB;
#   4. checks that the download alone resolves the install offline (stand-ins for what the machine has), and lists
#      what the wheels ask of the machine's own packages (NEEDS_ON_MACHINE.txt, e.g. pyarrow>=24 for datasets);
#   5. writes SOURCE.json (git commit + a digest of the sources, for a GPU machine that gets no git metadata; run
#      this script again after changing the code) and copies the HumanEval prompts into `wheelhouse/data/`.
# The GPU side (`scripts/gpu_evidence.sh`) installs with `pip install --no-index --find-links wheelhouse`, so pip
# takes a wheel from here only where the machine's own version does not satisfy a requirement, and never touches
# torch (it is pinned to the installed version by a constraint).
#
#   bash scripts/make_wheelhouse.sh                       # -> wheelhouse/ (ignored by git)
#   PYTHON=/path/to/python WHEELHOUSE=dir GPU_PYTHON_VERSION=3.12 HUMANEVAL=path bash scripts/make_wheelhouse.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${WHEELHOUSE:-wheelhouse}
PYVER=${GPU_PYTHON_VERSION:-3.12}
HUMANEVAL=${HUMANEVAL:-../shared/data/HumanEval.jsonl.gz}
MAX_MB=${WHEELHOUSE_MAX_MB:-60}
# what the GPU command installs (keep in step with scripts/gpu_evidence.sh)
REQUIREMENTS=(transformers==5.24.0 trl datasets kernels==0.17.2 liger-kernel)
# the GPU machine's torch and triton: resolved against as stand-in wheels without dependencies (so that torch's CUDA
# wheels are neither resolved nor downloaded); the real ones are never downloaded
GPU_TORCH=${GPU_TORCH:-2.11.0}
GPU_TRITON=${GPU_TRITON:-3.6.0}
# present on the GPU machine and large (or torch's own dependencies): never downloaded
EXCLUDE_RE='^(torch|triton|numpy|pandas|pyarrow|sympy|mpmath|networkx|setuptools|pip|wheel|nvidia-.*|cuda-.*)$'
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)
TARGET_FLAGS=(--only-binary=:all: --python-version "$PYVER" --implementation cp)
for platform in "${PLATFORMS[@]}"; do TARGET_FLAGS+=(--platform "$platform"); done

rm -rf "$DEST"
mkdir -p "$DEST"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== building hf-effitrain as a wheel"
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DEST" .
package_wheel=$(ls "$DEST"/hf_effitrain-*.whl)

# stand-in wheels without dependencies for what the GPU machine already has: `make_stubs DIR name==version ...`
make_stubs() {
    "$PY" - "$@" <<'PYEOF'
import sys, zipfile
from pathlib import Path
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for pin in sys.argv[2:]:
    name, version = pin.split("==")
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(out / f"{dist}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}.dist-info/RECORD", "")
PYEOF
}
machine_pins=("torch==$GPU_TORCH+installed" "triton==$GPU_TRITON+installed")
make_stubs "$work/stubs" "${machine_pins[@]}"

echo "== resolving ${REQUIREMENTS[*]} for CPython $PYVER (manylinux x86-64), against torch $GPU_TORCH, triton $GPU_TRITON"
"$PY" -m pip install --quiet --dry-run --ignore-installed --target "$work/target" --report "$work/report.json" \
    --find-links "$work/stubs" "${TARGET_FLAGS[@]}" "$package_wheel" "${REQUIREMENTS[@]}" "${machine_pins[@]}"

# pins.txt: what to download; present.txt: the resolved versions of what is skipped; needs.txt: what the wheels
# ask of the skipped packages (the GPU machine's versions must satisfy it)
"$PY" - "$work" "$EXCLUDE_RE" <<'PYEOF'
import json, re, sys
from pathlib import Path
work, exclude = Path(sys.argv[1]), re.compile(sys.argv[2])
report = json.loads((work / "report.json").read_text())
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins, present, needs = [], [], set()
for item in report["install"]:
    name, version = norm(item["metadata"]["name"]), item["metadata"]["version"]
    if name == "hf-effitrain":
        pass
    elif exclude.match(name):
        present.append(f"{name}=={version}")
    else:
        pins.append(f"{name}=={version}")
    for requirement in item["metadata"].get("requires_dist", []):
        head = requirement.split(";")[0].strip()
        required = norm(re.match(r"[A-Za-z0-9_.-]+", head).group())
        if "extra ==" not in requirement and exclude.match(required) and required not in ("torch", "triton"):
            needs.add(f"{head} (for {name})")
(work / "pins.txt").write_text("".join(f"{p}\n" for p in pins))
(work / "present.txt").write_text("".join(f"{p}\n" for p in present if not p.startswith(("torch==", "triton=="))))
(work / "needs.txt").write_text("".join(f"{n}\n" for n in sorted(needs)))
PYEOF
echo "== downloading $(wc -l < "$work/pins.txt") wheels (skipping what the GPU machine has: $EXCLUDE_RE)"
"$PY" -m pip download --quiet --no-deps "${TARGET_FLAGS[@]}" --dest "$DEST" -r "$work/pins.txt"
cp "$work/pins.txt" "$DEST/PINS.txt"
sort -u "$work/needs.txt" > "$DEST/NEEDS_ON_MACHINE.txt"

echo "== checking that $DEST alone resolves the install offline (stand-ins for torch, triton and the skipped packages)"
mapfile -t present < "$work/present.txt"
make_stubs "$work/offline" "${machine_pins[@]}" "${present[@]}"
"$PY" -m pip install --quiet --dry-run --ignore-installed --target "$work/target2" --no-index \
    --find-links "$DEST" --find-links "$work/offline" "${TARGET_FLAGS[@]}" \
    hf-effitrain "${REQUIREMENTS[@]}" "${machine_pins[@]}"
echo "   ok. The GPU machine's own packages must satisfy:"
sed 's/^/     /' "$work/needs.txt"

# the commit and a digest of the sources: the GPU side reads the commit from here when no git metadata travels
"$PY" scripts/gpu_evidence.py --source-info "$DEST/SOURCE.json"

if [ -f "$HUMANEVAL" ]; then
    mkdir -p "$DEST/data"
    cp "$HUMANEVAL" "$DEST/data/HumanEval.jsonl.gz"
else
    echo "warning: $HUMANEVAL not found: the decode benchmark will run on corpus prompts only" >&2
fi

size_mb=$(du -sm "$DEST" | cut -f1)
echo "== $DEST: $(ls "$DEST"/*.whl | wc -l) wheels, ${size_mb} MB"
if [ "$size_mb" -gt "$MAX_MB" ]; then
    echo "error: $DEST is ${size_mb} MB, over the ${MAX_MB} MB it must fit in; largest files:" >&2
    ls -S -l "$DEST" | head -6 >&2
    exit 1
fi
