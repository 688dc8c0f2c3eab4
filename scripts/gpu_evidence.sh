#!/usr/bin/env bash
# GPU evidence on a bare GPU machine: install what it lacks from wheelhouse/ (no package index), then run
# scripts/gpu_evidence.py (every benchmark at a size that fits 9 minutes; see its docstring).
#
#   bash scripts/make_wheelhouse.sh                                   # first, on a machine with a package index
#   bash scripts/gpu_evidence.sh --part kernels,patch,ode [--collect DIR] [any gpu_evidence.py option]
#   bash scripts/gpu_evidence.sh --dry-run                             # micro sizes on CPU, nothing installed
#
# --collect DIR: also pack scripts/results/ and the logs into DIR/gpu_evidence_results.tar.gz (with
# DIR/gpu_evidence.json and DIR/gpu_evidence.log beside it), for machines whose files are fetched from one folder.
# The install leaves torch alone: it is pinned to the installed version, and nothing else can replace it offline.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
collect=""
args=()
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --collect) collect=${2:?--collect needs a folder}; shift 2 ;;
        --dry-run|--plan) dry=1; args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done
log=$(mktemp)

install() {
    if [ ! -d "$WHEELHOUSE" ]; then
        echo "error: no $WHEELHOUSE/ here: run scripts/make_wheelhouse.sh on a machine with a package index first" >&2
        return 1
    fi
    local constraints
    constraints=$(mktemp)
    "$PY" - > "$constraints" <<'PYEOF' || return 1
import importlib.metadata as md
for name in ("torch", "triton"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PYEOF
    echo "== installing from $WHEELHOUSE/ (offline); kept as installed: $(tr '\n' ' ' < "$constraints")"
    local start=$SECONDS
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" --no-cache-dir --disable-pip-version-check \
        --constraint "$constraints" hf-effitrain transformers==5.24.0 trl datasets kernels==0.17.2 || return 1
    # Liger-Kernel is a comparison point only: the benchmark runs without it
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" --no-cache-dir --disable-pip-version-check \
        --constraint "$constraints" liger-kernel || echo "note: liger-kernel could not be installed; its rows are skipped"
    echo "== installed in $((SECONDS - start)) s"
}

status=0
if [ "$dry" = 0 ]; then
    install 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
fi
if [ "$status" = 0 ]; then
    PYTHONUNBUFFERED=1 "$PY" scripts/gpu_evidence.py "${args[@]}" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
fi
if [ -n "$collect" ]; then
    mkdir -p "$collect"
    cp "$log" "$collect/gpu_evidence.log"
    [ -f scripts/results/gpu_evidence.json ] && cp scripts/results/gpu_evidence.json "$collect/"
    tar czf "$collect/gpu_evidence_results.tar.gz" scripts/results $( [ -d runs/gpu_evidence ] && echo runs/gpu_evidence )
fi
rm -f "$log"
exit "$status"
