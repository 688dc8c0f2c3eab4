"""GPU evidence in one command: every benchmark at a size that fits a 9-minute run on one H100 / H200.

Each part runs its benchmark script as a subprocess, through the script's own command line, at an evidence size
(the script's GPU size with the overrides below), and writes that script's JSON + PNG under `scripts/results/`:

    kernels  bench_kernels.py  fused linear cross-entropy and ODE step (Triton) vs unfused torch, + Liger if installed
    patch    bench_patch.py    patch-level vs token-level training (34M llama)
    ode      bench_ode.py      ODE-shared models: validation loss and decode latency against solver steps
    decode   bench_decode.py   MSN + Jacobi / TR-Jacobi vs greedy, static-cache greedy, prompt lookup, in bf16
    msn      bench_msn_noise.py  MSN noise schedules from one pre-trained checkpoint: tokens per forward, float32
    cascade  bench_cascade.py  cascade-aware training variants vs standard fine-tuning: deferral curves

Before running, every part's time is estimated from its FLOPs (6 x params x tokens for training, 2 x params x
tokens for evaluation, plus attention) at the assumed sustained rates below, its batch-1 decoding forwards at an
assumed latency, and its data preparation from the size of the corpus on this machine. Parts whose estimates do not
fit the budget together (`--budget-s`, 9 minutes by default) are not started: the script prints how to split them
into separate commands (`--part kernels,patch`, `--part decode`, ...). Each part runs under its own time limit
(1.5 x its estimate, capped by what the budget leaves): a part that overruns is stopped (its whole process group)
and reported, and a later part that no longer fits what is left is reported as not started. A summary (device,
versions, commit, estimate vs measured seconds, the key numbers of every part) is printed, and merged into
`scripts/results/gpu_evidence.{json,png}`; each part's log goes to `runs/gpu_evidence/`. The GPU sizes need a CUDA
GPU; `--plan` and `--dry-run` do not.

    bash scripts/gpu_evidence.sh --part kernels,patch,ode      # installs from wheelhouse/ first, then runs this
    bash scripts/gpu_evidence.sh --part decode                  # (the split `--plan` prints on a 16-core machine)
    bash scripts/gpu_evidence.sh --part cascade
    bash scripts/gpu_evidence.sh --part msn
    python scripts/gpu_evidence.py --plan [--cores 16]          # print the estimates and the split, run nothing
    python scripts/gpu_evidence.py --dry-run                    # every part at a micro size on CPU (CI)
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, also when this file is loaded as a module
from bench_common import add_common_arguments, git_state, run_record, source_digest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "scripts" / "results"
LOGS = REPO / "runs" / "gpu_evidence"
HUMANEVAL_CANDIDATES = (
    REPO / "wheelhouse" / "data" / "HumanEval.jsonl.gz",
    REPO.parent / "shared" / "data" / "HumanEval.jsonl.gz",
)

# ---- the assumptions behind every estimate -------------------------------------------------------------------------
# H100 / H200 SXM dense bf16: 989 TFLOP/s by the datasheet; an 8192^3 bf16 matmul measured 770-800 TFLOP/s on an H200.
PEAK_BF16_FLOPS = 989e12
# Sustained training rate of 10-100M-parameter llamas under the stock Trainer (bf16 autocast, SDPA, no compile):
# 15% of peak. At hidden 512-768 and 16k tokens per step one projection is 10-50 us of tensor-core work, about what
# each memory-bound kernel around it costs (RMSNorm, rotary, SiLU, residual adds, autocast casts, the float32 loss
# over 16k x 8k logits: 16-500 MB each at ~4 TB/s), plus launch and optimizer overhead. The 30-40% reached by
# compiled, fused training loops would overestimate these runs; the measured rate of each part is printed next to
# its estimate, so the next run can correct this number.
TRAIN_FLOPS_PER_S = 0.15 * PEAK_BF16_FLOPS
# The loss benchmark's (N, H) x (H, V) products are large (N >= 8k, V >= 8k) but the unfused path is memory-bound on
# its logits: 30% of peak.
KERNEL_FLOPS_PER_S = 0.30 * PEAK_BF16_FLOPS
# Batch-1 decoding is latency-bound, not FLOP-bound (2 x 34M x 1 token = 68 MFLOP per forward, 0.1 us of compute):
# one `generate` step of an 8-layer model costs ~10 ms (~150 kernel launches plus the Python of the generation loop).
DECODE_FORWARD_S = 0.010
STATIC_COMPILE_S = 45  # static-cache greedy compiles its decode step (torch.compile) once per model
STARTUP_S = 20  # interpreter + torch / transformers / trl / datasets imports, CUDA context, first cuBLAS calls
RUN_OVERHEAD_S = 5  # per Trainer run: model copy to the GPU, optimizer, dataloader, first step
TRITON_COMPILE_S = 60  # the kernel benchmark JIT-compiles the Triton kernels (and Liger's) for every shape
# Data preparation, from the 2-core build machine (scripts/results/data_corpus_cpu.json): corpus build 254M
# characters in 18.5 s; tokenization 0.41M characters/s per core (223M characters in 273 s on 2 cores; half of
# that per core is assumed when spread over all cores); code-SFT extraction 0.70M characters/s in one process
# (223M in 318 s); the BPE trains on at most 20M characters, about a minute, cached after the first part.
READ_CHARS_PER_S = 13e6
TOKENIZE_CHARS_PER_S_PER_CORE = 0.41e6
SFT_CHARS_PER_S = 0.70e6
BPE_S = 60
LIMIT_FACTOR = 1.5  # a part is stopped at 1.5 x its estimate (or when the budget runs out, if sooner)
DEFAULT_BUDGET_S = 540  # 9 minutes: the whole command must end inside a 10-minute slot
DRY_LIMIT_S = 540  # each micro run takes seconds to a few minutes on a loaded 2-core machine; this stops a hung one


@dataclass
class Part:
    """One benchmark run: its script, GPU-size arguments, and the micro overrides of the dry run.

    The dry run passes `gpu_args` (without `gpu_only` switches) followed by `dry_args`: argparse keeps the last value
    of a flag, so the micro values win while every GPU flag still goes through the script's parser. Every script
    takes `--output <prefix>` and writes `<prefix>.json` and its PNGs `<prefix><suffix>.png` (`pngs`).
    """

    name: str
    script: str
    what: str
    gpu_args: list[str]
    dry_args: list[str]
    gpu_only: tuple[str, ...] = ()
    pngs: tuple[str, ...] = ("",)
    # the script keeps checkpoints in `--work-dir`: given a fresh temporary folder (not under scripts/results/)
    work_dir: bool = False


PARTS = {
    part.name: part
    for part in (
        Part(
            "kernels",
            "bench_kernels.py",
            "fused linear cross-entropy / ODE step vs unfused torch (+ Liger)",
            ["--size", "gpu", "--repeats", "3"],
            ["--size", "cpu-small", "--repeats", "1", "--max-sizes", "1", "--skip-e2e", "--device", "cpu"],
        ),
        Part(
            "patch",
            "bench_patch.py",
            "patch-level vs token-level training",
            ["--size", "gpu", "--bf16", "--scope", "all", "--max-files", "6000", "--tokens", "2e7", "--num-proc", "8"],
            [
                "--size",
                "cpu_small",
                "--preset",
                "tiny",
                "--scope",
                "stdlib",
                "--max-files",
                "20",
                "--vocab-size",
                "300",
                "--block-size",
                "16",
                "--batch-size",
                "4",
                "--tokens",
                "2e4",
                "--evals",
                "2",
                "--max-eval-blocks",
                "8",
                "--num-proc",
                "1",
                "--device",
                "cpu",
            ],
            gpu_only=("--bf16",),
        ),
        Part(
            "ode",
            "bench_ode.py",
            "ODE-shared: loss and decode latency vs solver steps",
            [
                "--size",
                "gpu",
                "--scope",
                "all",
                "--max-files",
                "6000",
                "--train-steps",
                "400",
                "--warmup-steps",
                "20",
                "--decode-prompts",
                "4",
                "--decode-new-tokens",
                "32",
            ],
            [
                "--size",
                "cpu-small",
                "--scope",
                "stdlib",
                "--max-files",
                "20",
                "--hidden-size",
                "32",
                "--num-heads",
                "4",
                "--intermediate-size",
                "64",
                "--depth",
                "4",
                "--vocab-size",
                "300",
                "--block-size",
                "16",
                "--batch-size",
                "4",
                "--train-steps",
                "3",
                "--warmup-steps",
                "1",
                "--eval-blocks",
                "4",
                "--decode-prompts",
                "1",
                "--decode-prompt-tokens",
                "8",
                "--decode-new-tokens",
                "4",
                "--device",
                "cpu",
            ],
        ),
        Part(
            "decode",
            "bench_decode.py",
            "MSN + Jacobi / TR-Jacobi vs greedy, static greedy, prompt lookup (bf16)",
            [
                "--size",
                "gpu",
                "--bf16",
                "--scope",
                "all",
                "--max-files",
                "2500",
                "--pretrain-steps",
                "1500",
                "--sft-steps",
                "400",
                "--humaneval-prompts",
                "12",
                "--corpus-prompts",
                "8",
                "--max-new-tokens",
                "64",
                "--repeats",
                "1",
            ],
            [
                "--size",
                "cpu_small",
                "--scope",
                "stdlib",
                "--max-files",
                "30",
                "--vocab-size",
                "300",
                "--block-size",
                "32",
                "--pretrain-steps",
                "3",
                "--pretrain-batch",
                "4",
                "--sft-steps",
                "2",
                "--sft-batch",
                "2",
                "--humaneval-prompts",
                "2",
                "--corpus-prompts",
                "1",
                "--max-new-tokens",
                "8",
                "--repeats",
                "1",
            ],
            gpu_only=("--bf16",),
        ),
        Part(
            "cascade",
            "bench_cascade.py",
            "cascade-aware training vs standard fine-tuning",
            [
                "--size",
                "gpu",
                "--pretrain-steps",
                "600",
                "--finetune-steps",
                "300",
                "--exact-match-examples",
                "0",
                "--speculative-prompts",
                "2",
            ],
            [
                "--size",
                "cpu_small",
                "--pretrain-steps",
                "3",
                "--finetune-steps",
                "2",
                "--presets",
                "standard,paper",
                "--exact-match-examples",
                "0",
                "--speculative-prompts",
                "1",
            ],
            pngs=("", "_sequence", "_decoded"),
        ),
        Part(
            "msn",
            "bench_msn_noise.py",
            "MSN noise schedules: tokens per forward of jacobi / tr_jacobi (float32)",
            [
                "--size",
                "gpu",
                "--max-files",
                "2500",
                "--pretrain-steps",
                "1500",
                "--sft-steps",
                "300",
                "--humaneval-prompts",
                "12",
                "--corpus-prompts",
                "8",
                "--max-new-tokens",
                "64",
                "--schedules",
                "L0,L1,L5",
            ],
            [
                "--size",
                "micro",
                "--max-files",
                "300",
                "--pretrain-steps",
                "3",
                "--sft-steps",
                "2",
                "--humaneval-prompts",
                "1",
                "--corpus-prompts",
                "1",
                "--max-new-tokens",
                "8",
                "--schedules",
                "L0,L5",
            ],
            work_dir=True,
        ),
    )
}


# ---- estimates ------------------------------------------------------------------------------------------------------
def llama_params(vocab: int, hidden: int, layers: int, intermediate: int) -> int:
    """Parameters of a llama with untied embeddings and as many key/value heads as heads."""
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden


def train_flops_per_token(params: int, layers: int, block: int, hidden: int) -> float:
    """6 N per trained token plus attention's 6 L T d (the PatchTrainer's estimate)."""
    return 6 * params + 6 * layers * block * hidden


def _flag(args: list[str], flag: str, default=None):
    """The value after the last `flag` in `args` (argparse keeps the last), else `default`."""
    return args[len(args) - 1 - args[::-1].index(flag) + 1] if flag in args else default


def _size_int(args: list[str], cfg: dict, key: str) -> int | None:
    """An integer size value: the `--<key>` flag in `args` (dashed spelling) if given, else the size table's `cfg[key]`."""
    value = _flag(args, f"--{key.replace('_', '-')}", cfg[key])
    return None if value is None else int(value)


@dataclass
class Estimate:
    """A part's estimated wall-clock seconds, FLOPs, and seconds per component (startup, data, training, ...)."""

    seconds: float
    flops: float
    parts: dict = field(default_factory=dict)  # component -> seconds


class CorpusSizer:
    """Characters of this interpreter's Python corpus per scope, from the file listing (sizes only, nothing read)."""

    def __init__(self):
        self._cache: dict = {}

    def chars(self, scope: str, max_files: int | None) -> float:
        """Characters of `scope`, scaled to `max_files` files (`load_corpus` draws them spread over the corpus)."""
        if scope not in self._cache:
            from hf_effitrain.data.sources import python_source_files

            files = python_source_files(scope)
            self._cache[scope] = (len(files), sum(f.size for f in files))
        count, size = self._cache[scope]
        return size * (1.0 if not max_files or max_files >= count else max_files / count)


def data_prep_s(chars: float, prepared: set, key, cores: int, sft: bool = False) -> dict:
    """Reading and caching the corpus and training the BPE (first use of `key` only), packing, code-SFT extraction."""
    out = {}
    if key not in prepared:
        out["read corpus"] = chars / READ_CHARS_PER_S
        out["train BPE"] = BPE_S
        prepared.add(key)
    out["tokenize"] = chars / (TOKENIZE_CHARS_PER_S_PER_CORE * max(1, cores) * 0.5)
    if sft:
        out["extract SFT"] = chars / SFT_CHARS_PER_S
    return out


def estimate(part: Part, sizer: CorpusSizer, prepared: set, cores: int) -> Estimate:
    """Seconds of one part at its GPU size, from its FLOPs, forwards and corpus (the assumptions at the top).

    Args:
        part (`Part`): the part; its sizes are the script's own tables with `part.gpu_args` applied.
        sizer (`CorpusSizer`): characters of the corpus scopes on this machine.
        prepared (`set`): corpora already read and tokenizer-trained by an earlier part of the same command
            (both are cached on disk); updated.
        cores (`int`): CPU cores for tokenization.

    Returns:
        `Estimate`: seconds, FLOPs and seconds per component.

    Raises:
        ValueError: `part.name` is not one of `PARTS`.
    """
    module = _load_script(part.script)
    args = part.gpu_args
    comp = {"startup": STARTUP_S}
    flops = 0.0
    if part.name == "kernels":
        sizes = module.SIZES["gpu"]
        repeats = int(_flag(args, "--repeats", 3))
        passes = repeats + 4  # warm-up, peak memory, the check (the provider's and torch's pass)
        for n, h, v, k in sizes:
            providers = 2.33 if k == 1 else 2  # effi recomputes the logits in backward (+1/3); Liger on K=1
            flops += passes * providers * 6 * n * h * v
        comp["loss fwd+bwd"] = flops / KERNEL_FLOPS_PER_S
        comp["triton compile"] = TRITON_COMPILE_S
        preset, vocab, block, batch, steps = module.E2E["gpu"]
        hidden, layers, _, intermediate = _preset_dims(preset)
        params = llama_params(vocab, hidden, layers, intermediate)
        e2e = (2 * steps + 8) * batch * block * train_flops_per_token(params, layers, block, hidden)
        flops += e2e
        comp["end-to-end training"] = e2e / TRAIN_FLOPS_PER_S + 3 * RUN_OVERHEAD_S
    elif part.name == "patch":
        cfg = dict(module.SIZES[_flag(args, "--size")])
        scope, max_files = _flag(args, "--scope", cfg["scope"]), int(_flag(args, "--max-files", cfg["max_files"] or 0))
        tokens = float(_flag(args, "--tokens", cfg["tokens"]))
        hidden, layers, _, intermediate = _preset_dims(cfg["preset"], cfg["config_overrides"])
        params = llama_params(cfg["vocab_size"], hidden, layers, intermediate)
        per_token = train_flops_per_token(params, layers, cfg["block_size"], hidden)
        runs = (_flag(args, "--runs") or ",".join(getattr(module, "RUNS", ("token", "patch", "token_half")))).split(",")
        # N tokens each; a patch run (lambda = 2/3, K = 4) costs half a token run, token_half is N/2
        train = sum(tokens * per_token * (1.0 if run == "token" else 0.5) for run in runs)
        evals = len(runs) * (cfg["evals"] + 2) * cfg["max_eval_blocks"] * cfg["block_size"] * 2 * params
        flops = train + evals
        comp.update(data_prep_s(sizer.chars(scope, max_files), prepared, (scope, max_files, cfg["vocab_size"]), cores))
        comp["training"] = train / TRAIN_FLOPS_PER_S + len(runs) * RUN_OVERHEAD_S
        comp["evaluation"] = evals / TRAIN_FLOPS_PER_S
    elif part.name == "ode":
        cfg = module.PRESETS[_flag(args, "--size")]
        steps = int(_flag(args, "--train-steps", cfg.train_steps))
        scope, max_files = _flag(args, "--scope", cfg.scope), int(_flag(args, "--max-files", cfg.max_files or 0))
        d, depth, block = cfg.hidden_size, cfg.depth, cfg.block_size
        layer = 6 * (4 * d * d + 3 * d * cfg.intermediate_size) + 6 * block * d
        head = 6 * cfg.vocab_size * d
        schedules = _flag(args, "--schedules", cfg.schedules).split(",")
        tokens = steps * cfg.batch_size * block
        train = sum(tokens * (ode_train_layer_evals(s, depth, cfg) * layer + head) for s in schedules)
        # evaluated at L, L/2, L/4 steps (`fine` also at 2L, the Llama at its L layers), summed layer evaluations
        settings = {"fine": [2 * depth, depth, depth // 2, depth // 4], "llama": [depth]}
        layer_evals = sum(sum(settings.get(s, [depth, depth // 2, depth // 4])) for s in schedules)
        prompts = int(_flag(args, "--decode-prompts", cfg.decode_prompts))
        new = int(_flag(args, "--decode-new-tokens", cfg.decode_new_tokens))
        evals = cfg.eval_blocks * block * layer_evals * layer / 3  # forward only: a third of the training FLOPs
        flops = train + evals
        comp.update(data_prep_s(sizer.chars(scope, max_files), prepared, (scope, max_files, cfg.vocab_size), cores))
        comp["training"] = train / TRAIN_FLOPS_PER_S + len(schedules) * RUN_OVERHEAD_S
        comp["evaluation"] = evals / TRAIN_FLOPS_PER_S
        comp["decoding"] = (prompts + 1) * new * DECODE_FORWARD_S * layer_evals / depth
    elif part.name == "decode":
        cfg = dict(module.SIZES[_flag(args, "--size")])

        get = functools.partial(_size_int, args, cfg)
        hidden, layers, _, intermediate = _preset_dims(cfg["preset"], cfg["config_overrides"])
        params = llama_params(cfg["vocab_size"], hidden, layers, intermediate)
        block = cfg["block_size"]
        pretrain = (
            get("pretrain_steps") * cfg["pretrain_batch"] * block * train_flops_per_token(params, layers, block, hidden)
        )
        sft = (
            2 * get("sft_steps") * cfg["sft_batch"] * cfg["sft_max_length"] * 6 * params
        )  # rows padded at most to max_length
        prompts = get("humaneval_prompts") + get("corpus_prompts")
        # every method at most one forward per new token (prompt lookup and the Jacobi methods need fewer), on every
        # fine-tuned model, plus one warm-up call per method
        methods = len(getattr(module, "METHODS", ("greedy", "static_greedy", "prompt_lookup", "jacobi", "tr_jacobi")))
        models = len((_flag(args, "--models") or "sft,msn").split(","))
        forwards = models * methods * (prompts * get("repeats") + 1) * get("max_new_tokens")
        flops = pretrain + sft + forwards * 2 * params  # 2 N per decoded token (a tree forward verifies more)
        chars = sizer.chars(_flag(args, "--scope", cfg["scope"]), get("max_files") or None)
        comp.update(data_prep_s(chars, prepared, ("decode", get("max_files")), cores, sft=True))
        comp["pre-training"] = pretrain / TRAIN_FLOPS_PER_S + RUN_OVERHEAD_S
        comp["SFT + MSN fine-tuning"] = sft / TRAIN_FLOPS_PER_S + 2 * (RUN_OVERHEAD_S + 5)
        comp["decoding"] = forwards * DECODE_FORWARD_S
        comp["static-cache compile"] = 2 * STATIC_COMPILE_S
    elif part.name == "cascade":
        cfg = dict(module.SIZES[_flag(args, "--size")])
        pre_steps = int(_flag(args, "--pretrain-steps", cfg["small_pretrain_steps"]))
        ft_steps = int(_flag(args, "--finetune-steps", cfg["finetune_steps"]))
        presets = (_flag(args, "--presets") or ",".join(_loss_presets())).split(",")
        tokens_per_step = cfg["batch_size"] * cfg["block_size"]
        small = llama_params(cfg["vocab_size"], cfg["small"][0], cfg["small"][1], cfg["small"][3])
        large = llama_params(cfg["vocab_size"], cfg["large"][0], cfg["large"][1], cfg["large"][3])
        pretrain = pre_steps * tokens_per_step * (6 * small + 6 * large)
        finetune = sum(
            ft_steps * tokens_per_step * (6 * small + (0 if p == "standard" else 2 * large)) for p in presets
        )
        flops = pretrain + finetune
        comp.update(data_prep_s(sizer.chars(cfg["scope"], cfg["max_files"]), prepared, ("cascade",), cores))
        comp["pre-training"] = pretrain / TRAIN_FLOPS_PER_S + 2 * RUN_OVERHEAD_S
        comp["fine-tuning"] = finetune / TRAIN_FLOPS_PER_S + len(presets) * RUN_OVERHEAD_S
        comp["deferral curves"] = 5 * len(presets)
        # decoded curves at batch 1 (latency-bound): per prompt and decoded small model, the small and large greedy
        # runs, the token cascade at every decoded point, the speculative cascade at every alpha of every rule, and
        # speculative decoding; each ~1.25 forwards per new token (drafts, lazy catch-up)
        prompts = int(_flag(args, "--speculative-prompts", cfg.get("speculative_prompts", 0)))
        decoded = [p for p in (_flag(args, "--speculative-presets") or "standard,paper").split(",") if p in presets]
        alphas = sum(len(v) for v in getattr(module, "DEFAULT_ALPHAS", {"rules": [0] * 21}).values())
        runs = 2 + cfg.get("decoded_points", 0) + alphas + 1
        forwards = prompts * len(decoded) * runs * 1.25 * cfg.get("new_tokens", 0)
        flops += forwards * 2 * (small + large)
        comp["decoded curves"] = forwards * DECODE_FORWARD_S
    elif part.name == "msn":
        cfg = dict(module.SIZES[_flag(args, "--size")])

        get = functools.partial(_size_int, args, cfg)
        hidden, layers, _, intermediate = _preset_dims(cfg["preset"])
        params = llama_params(cfg["vocab_size"], hidden, layers, intermediate)
        block = cfg["pretrain_block_size"]
        pretrain = (
            get("pretrain_steps") * cfg["pretrain_batch"] * block * train_flops_per_token(params, layers, block, hidden)
        )
        schedules = len((_flag(args, "--schedules") or cfg["schedules"]).split(","))
        sft = schedules * get("sft_steps") * cfg["sft_batch"] * cfg["sft_max_length"] * 6 * params
        prompts = get("humaneval_prompts") + get("corpus_prompts")
        # per model: greedy + every strategy per prompt, one warm-up call per strategy; at most a forward per token
        strategies = len(getattr(module, "STRATEGIES", ("jacobi", "tr_jacobi", "tr_jacobi_msn")))
        forwards = schedules * (prompts * (1 + strategies) + strategies) * get("max_new_tokens")
        flops = pretrain + sft + forwards * 2 * params
        chars = sizer.chars(_flag(args, "--scope", cfg["scope"]), get("max_files") or None)
        comp.update(data_prep_s(chars, prepared, ("msn", get("max_files")), cores, sft=True))
        comp["pre-training"] = pretrain / TRAIN_FLOPS_PER_S + RUN_OVERHEAD_S
        comp["fine-tuning"] = sft / TRAIN_FLOPS_PER_S + schedules * (RUN_OVERHEAD_S + 5)
        comp["decoding"] = forwards * DECODE_FORWARD_S
    else:
        raise ValueError(f"unknown part {part.name!r}; choose from {', '.join(PARTS)}")
    return Estimate(seconds=sum(comp.values()), flops=flops, parts={k: round(v, 1) for k, v in comp.items()})


def ode_train_layer_evals(schedule: str, depth: int, cfg) -> float:
    """Shared-layer evaluations per trained token of one ODE benchmark schedule (the Llama: its `depth` layers)."""
    random_mean = (depth + depth // 2 + depth // 4) / 3  # steps drawn from {L, L/2, L/4} per batch
    if schedule in ("plain", "llama"):
        return depth
    if schedule == "fine":
        return 2 * depth
    if schedule in ("random", "aware_random"):
        return random_mean
    if schedule == "aware_consistency":  # + one step of 2h and two of h per consistency sample
        return random_mean + 3 * getattr(cfg, "consistency_samples", 1)
    return 2 * depth  # a schedule this estimate does not know: counted as the costliest


def _preset_dims(preset: str, overrides: str = "") -> tuple[int, int, int, int]:
    """(hidden, layers, heads, intermediate) of a model preset with `key=value` config overrides applied."""
    from hf_effitrain.models.presets import PRESETS as MODEL_PRESETS

    p = MODEL_PRESETS[preset]
    dims = {
        "hidden_size": p.hidden_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "intermediate_size": p.intermediate_size,
    }
    for item in filter(None, (overrides or "").split(",")):
        key, value = item.split("=")
        if key.strip() in dims:
            dims[key.strip()] = int(value)
    return dims["hidden_size"], dims["num_hidden_layers"], dims["num_attention_heads"], dims["intermediate_size"]


def _loss_presets() -> list[str]:
    from hf_effitrain.methods.cascade import LOSS_PRESETS

    return list(LOSS_PRESETS)


_MODULES: dict = {}


def _load_script(name: str):
    """The benchmark script as a module (its size tables), without running it."""
    if name not in _MODULES:
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"_bench_{Path(name).stem}", REPO / "scripts" / name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


def split_into_commands(names: list[str], estimates: dict[str, Estimate], budget_s: float) -> list[list[str]]:
    """Group parts, in order, into commands whose estimated seconds fit `budget_s`.

    Args:
        names (`list[str]`): part names in run order.
        estimates (`dict[str, Estimate]`): estimate per part.
        budget_s (`float`): seconds one command may take.

    Returns:
        `list[list[str]]`: one list of part names per command; a part over the budget on its own gets a command alone.
    """
    groups: list[list[str]] = []
    total = budget_s + 1
    for name in names:
        if groups and total + estimates[name].seconds <= budget_s:
            groups[-1].append(name)
            total += estimates[name].seconds
        else:
            groups.append([name])
            total = estimates[name].seconds
    return groups


# ---- running --------------------------------------------------------------------------------------------------------
def run_limited(
    command: list[str], limit_s: float, log_path: Path, env: dict | None = None
) -> tuple[str, float, int | None]:
    """Run `command` with its output in `log_path`; stop its whole process group after `limit_s` seconds.

    Args:
        command (`list[str]`): the program and its arguments.
        limit_s (`float`): seconds before the command and every process it started are stopped.
        log_path (`Path`): file for the command line, stdout and stderr.
        env (`dict`, *optional*): environment of the command (default: this process's).

    Returns:
        `(status, seconds, returncode)`: status is "ok", "failed" (non-zero exit) or "timeout" (stopped at the limit).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, preexec_fn=_own_group)
        try:
            returncode = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return "timeout", time.monotonic() - start, None
        except BaseException:  # interrupted or terminated ourselves: the part must not outlive this command
            _stop_group(proc)
            raise
    return ("ok" if returncode == 0 else "failed"), time.monotonic() - start, returncode


def _own_group() -> None:
    """In the part's process, before it starts: a process group of its own (stopped as a whole at the limit), and,
    on Linux, SIGKILL if this command dies without stopping it."""
    os.setpgrp()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the part's process group (its data workers too), SIGKILL whatever is left after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def part_command(part: Part, stem: Path, dry: bool, humaneval: Path | None) -> list[str]:
    """The part's command line: GPU-size arguments, then (dry run) the micro overrides, then its output path."""
    args = [a for a in part.gpu_args if not (dry and a in part.gpu_only)]
    if dry:
        args += part.dry_args
    if part.name in ("decode", "msn") and humaneval is not None:
        args += ["--humaneval", str(humaneval)]
    if part.work_dir:
        args += ["--work-dir", tempfile.mkdtemp(prefix=f"gpu_evidence_{part.name}_")]
    return [sys.executable, str(REPO / "scripts" / part.script), *args, "--output", str(stem)]


def micro_humaneval(folder: Path) -> Path:
    """Two HumanEval-style prompts for the dry run (the real file is 164 prompts)."""
    path = folder / "HumanEval_micro.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for i, prompt in enumerate(["def add(a, b):\n    ", "def is_even(n):\n    "]):
            handle.write(json.dumps({"task_id": f"HumanEval/{i}", "prompt": prompt}) + "\n")
    return path


# ---- what a part found ----------------------------------------------------------------------------------------------
def key_results(name: str, result: dict) -> str:
    """One line of the part's headline numbers, read from its JSON.

    Raises:
        KeyError, TypeError, ValueError: the JSON lacks what the line is made of (reported as unreadable).
    """
    if name == "kernels":
        rows = [r for r in result["rows"] if r["op"] == "linear_cross_entropy"]
        torch_rows = {(r["N"], r["H"], r["V"], r["K"]): r for r in rows if r["provider"] == "torch"}
        ratios = [
            (
                r["time_ms_median"] / torch_rows[k]["time_ms_median"],
                r["peak_mem_mb"] / max(torch_rows[k]["peak_mem_mb"], 1e-9),
            )
            for r in rows
            if r["provider"] == "effi" and (k := (r["N"], r["H"], r["V"], r["K"])) in torch_rows
        ]
        times, mems = [t for t, _ in ratios], [m for _, m in ratios]
        text = (
            f"effi/torch over {len(ratios)} sizes: time {min(times):.2f}-{max(times):.2f}x, "
            f"peak memory {min(mems):.2f}-{max(mems):.2f}x"
        )
        liger = sum(r["provider"] == "liger" for r in rows)
        ode = [r for r in result["rows"] if r["op"] == "ode_step_rms_norm"]
        return text + f"; liger rows {liger}; ode-step rows {len(ode)}"
    if name == "patch":
        s, parts = result["summary"], []
        for run in [key.removesuffix("_over_token_flops") for key in s if key.endswith("_over_token_flops")]:
            winner = s.get(f"{run}_equal_compute_winner", s.get("equal_compute_winner"))
            parts.append(
                f"{run}: FLOPs x{s[f'{run}_over_token_flops']:.3f}, loss vs token {s[f'{run}_minus_token_loss']:+.3f}, "
                f"vs token_half {s.get(f'{run}_minus_token_half_loss', float('nan')):+.3f} ({winner} wins at equal compute)"
            )
        if not parts:
            raise KeyError("no <run>_over_token_flops in the summary")
        return "; ".join(parts)
    if name == "ode":
        parts = []
        for schedule, run in result["runs"].items():
            losses = "/".join(f"{row['validation_loss']:.3f}" for row in run["eval"])
            steps = "/".join(str(row["num_steps"]) for row in run["eval"])
            parts.append(f"{schedule} @{steps}: {losses}")
        return "; ".join(parts)
    if name == "decode":
        parts = []
        for model, methods in result["decoding"].items():
            best = ", ".join(
                f"{m} {v['speedup_vs_greedy']:.2f}x/{v['agreement']:.2f}" for m, v in methods.items() if m != "greedy"
            )
            parts.append(f"{model}: {best}")
        return "speedup/agreement with greedy: " + "; ".join(parts)
    if name == "msn":
        parts = []
        for schedule, model in result["models"].items():
            counts = ", ".join(
                f"{strategy} {row['tokens_per_forward'][0]:.2f} ({row['equal_to_greedy']}/{row['prompts']} exact)"
                for strategy, row in model["decoding"].items()
            )
            parts.append(f"{schedule} (loss {model['eval_loss']:.3f}): {counts}")
        return "tokens per forward: " + "; ".join(parts)
    if name == "cascade":
        gain = result.get("best_gain_in_token_area_vs_standard")
        gain_text = "n/a" if gain is None else f"{gain:+.4f}"
        return f"best CAT preset by token area: {result['best_cat_preset_by_token_area']} ({gain_text} vs standard)"
    raise ValueError(f"unknown part {name!r}")


# ---- provenance -----------------------------------------------------------------------------------------------------
def environment() -> dict:
    """This command's run record (`bench_common.run_record`: device, date, command, versions, commit, source digest)."""
    import torch

    record = run_record(
        "cuda" if torch.cuda.is_available() else "cpu",
        extra_packages=("triton", "kernels", "liger-kernel", "huggingface-hub"),
    )
    return {**record, "cpu_count": os.cpu_count()}


# ---- report ---------------------------------------------------------------------------------------------------------
def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["parts"])
    estimated = [summary["parts"][n]["estimate_s"] for n in names]
    measured = [summary["parts"][n].get("seconds") or 0 for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], estimated, 0.4, label="estimated")
    bars = ax.bar([x + 0.2 for x in xs], measured, 0.4, label="measured")
    for bar, name in zip(bars, names):
        ax.annotate(
            summary["parts"][name]["status"],
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("seconds")
    ax.legend()
    env = summary["environment"]
    kind = "dry run (micro sizes; the estimates are for the GPU sizes)" if summary.get("dry_run") else "GPU evidence"
    ax.set_title(f"{kind}: {env['device']}, {env['date'][:10]}, commit {str(env.get('git_commit'))[:8]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(rows: list[dict], rates: bool = True) -> None:
    header = f"{'part':8s} {'status':8s} {'est s':>6s} {'limit s':>7s} {'meas s':>7s} {'TFLOP/s':>8s}  key results"
    print(header)
    print("-" * len(header))
    for row in rows:
        measured = row.get("seconds")
        rate = row["estimate_flops"] / measured / 1e12 if measured and rates else None
        print(
            f"{row['part']:8s} {row['status']:8s} {row['estimate_s']:6.0f} {row.get('limit_s') or 0:7.0f} "
            f"{measured or 0:7.0f} {'' if rate is None else f'{rate:8.1f}':>8s}  {row.get('key_results', '')}"
        )
    print("(TFLOP/s: the part's estimated FLOPs over its measured wall time, data preparation included)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", help=f"comma-separated parts ({', '.join(PARTS)}) or 'all'")
    parser.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds the parts of this command may take together"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="every part at a micro size on CPU, outputs in a temp folder"
    )
    parser.add_argument(
        "--plan", action="store_true", help="print the estimates and the split into commands; run nothing"
    )
    add_common_arguments(
        parser,
        output_aliases=("--out-dir",),
        output_help="results folder (default scripts/results; dry run: a temp folder)",
    )
    parser.add_argument(
        "--log-dir", default=None, help="logs of the parts (default runs/gpu_evidence; dry run: <output>/logs)"
    )
    parser.add_argument(
        "--humaneval", default=None, help="HumanEval.jsonl.gz (default wheelhouse/data/ or ../shared/data/)"
    )
    parser.add_argument(
        "--cores", type=int, default=None, help="CPU cores the estimates assume (default: this machine's)"
    )
    parser.add_argument(
        "--source-info", metavar="JSON", help="only write the commit and source digest to JSON and exit"
    )
    args = parser.parse_args(argv)
    names = list(PARTS) if args.part == "all" else [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        parser.error(f"--part: unknown {unknown or args.part!r}; choose from {', '.join(PARTS)} or 'all'")
    args.names = [n for n in PARTS if n in names]  # always in the fixed order
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.cores is not None and args.cores < 1:
        parser.error(f"--cores must be >= 1, got {args.cores}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.source_info:
        Path(args.source_info).write_text(
            json.dumps({**git_state(), "source_digest": source_digest()}, indent=1) + "\n"
        )
        return 0
    cores = args.cores or os.cpu_count() or 1
    sizer, prepared = CorpusSizer(), set()
    estimates = {name: estimate(PARTS[name], sizer, prepared, cores) for name in args.names}
    print(
        f"Estimates (training at {TRAIN_FLOPS_PER_S / 1e12:.0f} TFLOP/s = {TRAIN_FLOPS_PER_S / PEAK_BF16_FLOPS:.0%} of bf16 peak, "
        f"loss kernels at {KERNEL_FLOPS_PER_S / 1e12:.0f}, {DECODE_FORWARD_S * 1e3:.0f} ms per decoding forward, {cores} cores):"
    )
    for name, est in estimates.items():
        print(
            f"  {name:8s} {est.seconds:6.0f} s  {est.flops:.2e} FLOPs  "
            + ", ".join(f"{k} {v:.0f}" for k, v in est.parts.items())
        )
    groups = split_into_commands(args.names, estimates, args.budget_s)
    total = sum(e.seconds for e in estimates.values())
    if args.plan or (len(groups) > 1 and not args.dry_run):
        print(f"{total:.0f} s estimated in all; within {args.budget_s:.0f} s per command, run:")
        for group in groups:
            seconds = sum(estimates[n].seconds for n in group)
            print(f"  bash scripts/gpu_evidence.sh --part {','.join(group)}    # ~{seconds:.0f} s")
        return 0 if args.plan else 2
    if not args.dry_run and estimates[args.names[0]].seconds > args.budget_s:
        print(
            f"note: {args.names[0]} is estimated at {estimates[args.names[0]].seconds:.0f} s, over the {args.budget_s:.0f} s budget: "
            "it runs until the budget ends and is stopped there if it has not finished"
        )

    if not args.dry_run and not _cuda_available():
        print(
            "error: the GPU sizes need a CUDA GPU and none is visible; on a CPU use --dry-run (micro sizes) or --plan"
        )
        return 2
    out_dir = (
        Path(args.output)
        if args.output
        else (Path(tempfile.mkdtemp(prefix="gpu_evidence_dry_")) if args.dry_run else RESULTS)
    )
    log_dir = Path(args.log_dir) if args.log_dir else (out_dir / "logs" if args.dry_run else LOGS)
    out_dir.mkdir(parents=True, exist_ok=True)
    humaneval = (
        micro_humaneval(out_dir)
        if args.dry_run
        else next(
            (p for p in ([Path(args.humaneval)] if args.humaneval else HUMANEVAL_CANDIDATES) if p.is_file()), None
        )
    )
    if not args.dry_run and "decode" in args.names and humaneval is None:
        print(
            "warning: no HumanEval.jsonl.gz found (--humaneval): the decode part runs on held-out corpus prompts only"
        )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "EFFI_KERNELS_DIR": str(REPO / "kernels"),
        "PYTHONUNBUFFERED": "1",
    }
    # nothing is downloaded at run time: offline mode keeps a machine without network from waiting on Hub requests
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    if args.dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    environment_info = environment()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # stops the running part too
    start, rows = time.monotonic(), []
    for name in args.names:
        # each part may overrun its estimate by half, within what is left of the budget; a later part that no
        # longer fits is not started (and reported), rather than an earlier one stopped near its end
        left = args.budget_s - (time.monotonic() - start)
        limit = DRY_LIMIT_S if args.dry_run else max(0.0, min(LIMIT_FACTOR * estimates[name].seconds, left))
        skip = not args.dry_run and limit < estimates[name].seconds and len(args.names) > 1
        rows.append(run_part(PARTS[name], estimates[name], limit, skip, args.dry_run, out_dir, log_dir, humaneval, env))

    summary_path = out_dir / "gpu_evidence.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() and not args.dry_run else {"parts": {}}
    summary.update(
        benchmark="GPU evidence: every benchmark at a 9-minute size",
        environment=environment_info,
        assumptions=_assumptions(),
        dry_run=args.dry_run,
    )
    for row in rows:
        summary["parts"][row["part"]] = {**row, "environment": environment_info}
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, summary_path.with_suffix(".png"))
    print(
        f"\n{environment_info['device']} | torch {environment_info['versions']['torch']} | transformers "
        f"{environment_info['versions']['transformers']} | commit {environment_info.get('git_commit')} "
        f"(dirty: {environment_info.get('git_dirty')}) | {environment_info['date']}"
    )
    print_table(rows, rates=not args.dry_run)
    print(f"wrote {summary_path} and {summary_path.with_suffix('.png')}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def run_part(
    part: Part,
    est: Estimate,
    limit: float,
    skip: bool,
    dry: bool,
    out_dir: Path,
    log_dir: Path,
    humaneval: Path | None,
    env: dict,
) -> dict:
    """Run one part under `limit` seconds (or record it as skipped) and read its headline numbers.

    Returns:
        `dict`: the part's summary row: command, estimate, limit, status ("ok", "failed", "timeout", "skipped"),
        seconds, files and key results.
    """
    tag = "dry" if dry else "gpu"
    stem = out_dir / f"{part.name}_{tag}"
    command = part_command(part, stem, dry, humaneval)
    row = {
        "part": part.name,
        "script": f"scripts/{part.script}",
        "what": part.what,
        "estimate_s": round(est.seconds, 1),
        "estimate_flops": est.flops,
        "estimate_breakdown_s": est.parts,
        "limit_s": round(limit, 1),
        "command": " ".join(["python", *command[1:]]).replace(str(REPO) + "/", ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if skip:
        row.update(
            status="skipped",
            key_results=f"not started: {limit:.0f} s of the budget left, {est.seconds:.0f} s estimated",
        )
        return row
    print(f"[{part.name}] limit {limit:.0f} s: {row['command']}", flush=True)
    log = log_dir / f"{part.name}_{tag}.log"
    status, seconds, returncode = run_limited(command, limit, log, env)
    row.update(status=status, seconds=round(seconds, 1), returncode=returncode, log=_relative(log))
    if status != "ok":
        row["key_results"] = f"{status} after {seconds:.0f} s (returncode {returncode}); log: {row['log']}"
        print(f"[{part.name}] {status}; last lines of {row['log']}:\n" + _tail(log, 30), flush=True)
        return row
    result_path = Path(f"{stem}.json")
    row["result_json"] = _relative(result_path)
    row["pngs"] = [_relative(png) for suffix in part.pngs if (png := Path(f"{stem}{suffix}.png")).is_file()]
    try:
        row["key_results"] = key_results(part.name, json.loads(result_path.read_text()))
    except (OSError, KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        row["key_results"] = f"result unreadable: {type(error).__name__}: {error}"
    return row


def _relative(path: Path) -> str:
    """`path` relative to the repository when inside it (how the results are committed), else absolute."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _assumptions() -> dict:
    return {
        "peak_bf16_flops": PEAK_BF16_FLOPS,
        "train_flops_per_s": TRAIN_FLOPS_PER_S,
        "kernel_flops_per_s": KERNEL_FLOPS_PER_S,
        "decode_forward_s": DECODE_FORWARD_S,
        "static_compile_s": STATIC_COMPILE_S,
        "startup_s": STARTUP_S,
        "run_overhead_s": RUN_OVERHEAD_S,
        "triton_compile_s": TRITON_COMPILE_S,
        "read_chars_per_s": READ_CHARS_PER_S,
        "tokenize_chars_per_s_per_core": TOKENIZE_CHARS_PER_S_PER_CORE,
        "sft_chars_per_s": SFT_CHARS_PER_S,
        "bpe_s": BPE_S,
        "limit_factor": LIMIT_FACTOR,
    }


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


if __name__ == "__main__":
    sys.exit(main())
