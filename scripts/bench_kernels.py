"""Benchmark the fused kernels against unfused torch: forward+backward time and peak memory, side by side.

Linear + multi-target cross-entropy, for every shape of the size's shared list:
- `torch`: unfused, the (N, V) logits materialised (`F.linear`, float32 `log_softmax` once, K gathers: the official
  patch-level code's loss);
- `effi`: `hf_effitrain.ops.fused_linear_cross_entropy` (the Triton kernel on CUDA; on CPU its chunked torch
  reference, which is what CPU users run);
- `liger`: Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` (K=1 only; CUDA only; if installed).
ODE step + RMSNorm: the eager `OdeStepRMSNorm` against the `EffiOdeStepRMSNorm` kernel (CUDA only).
End to end: `PatchTrainer` (K=4, half the tokens at patch level, then token level) with `use_fused_loss` off / on,
tokens per second and peak memory of the whole `train()`.

Outputs are checked against `torch` before timing. Time: median of `--repeats` forward+backward passes after a
warm-up. Peak memory: on CUDA `max_memory_allocated` above the inputs; on CPU the peak resident set above the inputs
(VmHWM after resetting it through /proc/self/clear_refs; glibc is pinned to mmap every allocation >= 64 KiB, so
freed tensors leave the RSS at once). Writes JSON (device, date, command, versions, git commit, every number) and a
PNG.

    python scripts/bench_kernels.py --size cpu-small --output scripts/results/kernels_cpu_small
    python scripts/bench_kernels.py --size gpu --output scripts/results/kernels_gpu
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

# must be in place before the allocator starts: re-executed below when missing
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_common import add_common_arguments, output_stem, run_record, with_suffix  # noqa: E402

from hf_effitrain.hub.modeling_ode_shared import OdeStepRMSNorm  # noqa: E402
from hf_effitrain.ops import fused_linear_cross_entropy, load_kernel_module  # noqa: E402

IGNORE = -100
# Shared size lists: (N rows, H hidden, V vocab, K targets per row)
SIZES = {
    # the grid: V in {8k, 32k, 128k}, N in {8k, 32k}, H in {512, 2048}, K in {1, 4}
    "gpu": list(itertools.product((8192, 32768), (512, 2048), (8192, 32768, 131072), (1, 4))),
    # small enough for ~6 minutes on one loaded CPU core
    "cpu-small": [(n, 256, v, k) for n, v in ((1024, 8192), (1024, 32768), (4096, 8192)) for k in (1, 4)],
}
ODE_SIZES = {"gpu": [(8, 2048, 2048), (8, 4096, 4096)], "cpu-small": []}
DTYPES = {"gpu": "bfloat16", "cpu-small": "float32"}
# end-to-end patch-level training: (model preset, vocab, block tokens, per-device batch, optimizer steps)
E2E = {"gpu": ("base", 32768, 2048, 8, 40), "cpu-small": ("tiny", 8192, 256, 8, 12)}


def unfused_torch_loss(hidden, weight, targets, ignore_index=IGNORE):
    """Materialised logits, one float32 log_softmax, K gathers; per-column means averaged (the patch-level loss)."""
    log_probs = F.log_softmax(F.linear(hidden, weight).float(), dim=-1)
    valid = targets != ignore_index
    nll = -log_probs.gather(1, targets.masked_fill(~valid, 0)) * valid
    return (nll.sum(0) / valid.sum(0).clamp_min(1)).mean()


def liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    return lambda hidden, weight, targets: loss(weight, hidden, targets[:, 0])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(step, device, release=None) -> float:
    """Extra peak memory of one `step()` above what is live before it.

    `release()` frees what an earlier step left behind and the step rebuilds (e.g. the gradients), before the
    baseline is read: otherwise the step would free it first and what it allocates in its place would not count.
    """
    if release is not None:
        release()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    return (_rss_kib("VmHWM") - base) / 1024


def time_ms(step, device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def lce_inputs(n, h, v, k, dtype, device, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=generator) * h**-0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n, k), generator=generator)
    targets[::17] = IGNORE  # some padding
    return hidden, weight, targets.to(device)


def fwd_bwd(loss_fn, hidden, weight, targets):
    def step():
        clear_grads(hidden, weight)
        loss_fn(hidden, weight, targets).backward()

    return step


def clear_grads(*tensors) -> None:
    for tensor in tensors:
        tensor.grad = None


def check_close(loss_fn, reference_fn, inputs, dtype) -> float:
    """Max abs difference of loss and gradients against the reference; raises if beyond the dtype's tolerance."""
    results = []
    for fn in (loss_fn, reference_fn):
        hidden, weight, _ = inputs
        hidden.grad = weight.grad = None
        loss = fn(*inputs)
        loss.backward()
        results.append([loss.detach().float(), hidden.grad.float(), weight.grad.float()])
    diff = max((a - b).abs().max().item() for a, b in zip(*results))
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    if diff > tolerance:
        raise AssertionError(f"outputs differ from unfused torch by {diff} > {tolerance}")
    return diff


def bench_linear_cross_entropy(sizes, dtype, device, repeats):
    providers = {"torch": unfused_torch_loss, "effi": fused_linear_cross_entropy}
    if device.type == "cuda" and liger_loss() is not None:
        providers["liger"] = liger_loss()
    effi_path = "triton" if device.type == "cuda" else "torch-chunked-reference"
    rows = []
    for n, h, v, k in sizes:
        inputs = lce_inputs(n, h, v, k, dtype, device)
        for name, fn in providers.items():
            if name == "liger" and k != 1:
                continue
            diff = 0.0 if name == "torch" else check_close(fn, unfused_torch_loss, inputs, dtype)
            step = fwd_bwd(fn, *inputs)
            times = time_ms(step, device, repeats)
            peak = peak_memory_mb(step, device, release=lambda inputs=inputs: clear_grads(*inputs[:2]))
            rows.append({
                "op": "linear_cross_entropy", "provider": name, "path": effi_path if name == "effi" else name,
                "N": n, "H": h, "V": v, "K": k, "dtype": str(dtype).removeprefix("torch."),
                "time_ms_median": statistics.median(times), "time_ms_all": times, "peak_mem_mb": peak,
                "max_abs_diff_vs_torch": diff,
            })  # fmt: skip
            print(f"lce N={n} H={h} V={v} K={k} {name:6s} {rows[-1]['time_ms_median']:9.2f} ms  {peak:9.1f} MB")
        del inputs
    return rows


def bench_ode_step(sizes, dtype, device, repeats):
    if not sizes:
        return []
    kernel = load_kernel_module("effi_ode_step")
    rows = []
    for batch, seq, hidden_size in sizes:
        layer = OdeStepRMSNorm(hidden_size).to(device)
        x = torch.randn(batch, seq, hidden_size, device=device, dtype=dtype, requires_grad=True)
        update = torch.randn_like(x, requires_grad=True)
        providers = {
            "torch": lambda: layer(x, update, 0.5),
            "effi": lambda: kernel.ode_step_rms_norm(x, update, layer.weight, 0.5, layer.variance_epsilon),
        }
        reference = None
        for name, forward in providers.items():

            def step(forward=forward):
                x_new, y = forward()
                (x_new.float().sum() + y.float().square().sum()).backward()

            clear_grads(x, update)
            step()
            outputs = [t.detach().float() for t in (*forward(), x.grad, update.grad)]
            if reference is None:
                reference = outputs
            else:  # outputs and gradients checked against eager before timing
                diff = max((a - b).abs().max().item() for a, b in zip(outputs, reference))
                tolerance = 1e-4 if dtype == torch.float32 else 5e-2
                if diff > tolerance:
                    raise AssertionError(f"ode step outputs / gradients differ from eager by {diff} > {tolerance}")

            forward_times = time_ms(lambda forward=forward: forward(), device, repeats)
            times = time_ms(step, device, repeats)
            rows.append({
                "op": "ode_step_rms_norm", "provider": name, "B": batch, "T": seq, "H": hidden_size,
                "dtype": str(dtype).removeprefix("torch."), "forward_ms_median": statistics.median(forward_times),
                "time_ms_median": statistics.median(times), "time_ms_all": times,
                "peak_mem_mb": peak_memory_mb(step, device, release=lambda: clear_grads(x, update)),
            })  # fmt: skip
            print(f"ode B={batch} T={seq} H={hidden_size} {name:6s} {rows[-1]['time_ms_median']:9.3f} ms")
    return rows


def bench_patch_training(config, dtype, device) -> list[dict]:
    """Tokens/s and peak memory of a short `PatchTrainer` run, fused loss off and on (same data, same seed)."""
    import tempfile

    from datasets import Dataset

    from hf_effitrain.methods.patch.config import PatchTrainingArguments
    from hf_effitrain.methods.patch.trainer import PatchTrainer
    from hf_effitrain.models.presets import build_model

    preset, vocab, block, batch, steps = config
    ids = torch.randint(0, vocab, (4 * batch * steps, block), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist()})
    rows = []
    # a short unmeasured run first: one-time costs (lazy imports, allocator warm-up) would bias the first provider
    for provider, fused, max_steps in (("warm-up", False, 8), ("torch", False, steps), ("effi", True, steps)):
        model = build_model(preset, "llama", seed=0, vocab_size=vocab, max_position_embeddings=block)
        with tempfile.TemporaryDirectory() as tmp:
            args = PatchTrainingArguments(
                output_dir=tmp, patch_size=4, patch_fraction=0.5, max_steps=max_steps, per_device_train_batch_size=batch,
                learning_rate=1e-4, save_strategy="no", report_to=[], use_cpu=device.type == "cpu",
                bf16=dtype == torch.bfloat16, logging_steps=1, disable_tqdm=True, use_fused_loss=fused, seed=0,
            )  # fmt: skip
            trainer = PatchTrainer(model=model, args=args, train_dataset=data)
            start = time.perf_counter()
            peak = peak_memory_mb(trainer.train, device)
            seconds = time.perf_counter() - start
        if provider == "warm-up":
            continue
        tokens = trainer.state.log_history[-1]["train_tokens"]
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        rows.append({
            "op": "patch_training", "provider": provider, "preset": preset, "V": vocab,
            "block": block, "batch": batch, "steps": steps, "dtype": str(dtype).removeprefix("torch."),
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mem_mb": peak,
            "logged_losses": losses,
        })  # fmt: skip
        print(f"patch training fused={fused} {rows[-1]['tokens_per_s']:9.0f} tokens/s  {peak:9.1f} MB")
    return rows


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lce = [r for r in rows if r["op"] == "linear_cross_entropy"]
    labels = sorted({(r["N"], r["H"], r["V"], r["K"]) for r in lce})
    providers = [p for p in ("torch", "effi", "liger") if any(r["provider"] == p for r in lce)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(labels) + 4), 4.5))
    width = 0.8 / len(providers)
    for axis, key, ylabel in ((axes[0], "time_ms_median", "fwd+bwd time (ms, median)"),
                              (axes[1], "peak_mem_mb", "peak memory above inputs (MB)")):  # fmt: skip
        for i, provider in enumerate(providers):
            values = {(r["N"], r["H"], r["V"], r["K"]): r[key] for r in lce if r["provider"] == provider}
            xs = [j + i * width for j, label in enumerate(labels) if label in values]
            axis.bar(xs, [values[label] for label in labels if label in values], width, label=provider)
        axis.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(labels))])
        axis.set_xticklabels([f"N{n}\nV{v}\nK{k}" for n, h, v, k in labels], fontsize=7)
        axis.set_ylabel(ylabel)
        axis.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        parser,
        SIZES,
        "cpu-small",
        "scripts/results/kernels_cpu_small",
        size_aliases=("--preset",),
        output_aliases=("--out",),
        device_default="cuda" if torch.cuda.is_available() else "cpu",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: per size")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (median reported)")
    parser.add_argument("--max-sizes", type=int, default=None, help="only the first N sizes of the list")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end PatchTrainer throughput run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or DTYPES[args.size])
    sizes = SIZES[args.size][: args.max_sizes]
    torch.manual_seed(0)
    rows = bench_linear_cross_entropy(sizes, dtype, device, args.repeats)
    ode_rows = bench_ode_step(ODE_SIZES[args.size] if device.type == "cuda" else [], dtype, device, args.repeats)
    e2e_rows = [] if args.skip_e2e else bench_patch_training(E2E[args.size], dtype, device)
    result = {
        **run_record(str(device), extra_packages=("triton", "kernels", "liger-kernel")),
        "preset": args.size,  # the key of earlier results
        "size": args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": args.repeats,
        "notes": []
        if device.type == "cuda"
        else [
            "CPU run: `effi` is the chunked torch reference (the CPU path), not the Triton kernel.",
            "Triton kernel, Liger and ODE-step figures need a CUDA GPU: pending.",
            "patch_training rows: tiny model on CPU, `effi` = the chunked torch reference inside PatchTrainer.",
            "CPU timings are noisy: the 2 cores are shared with other jobs.",
        ],  # fmt: skip
        "rows": rows + ode_rows + e2e_rows,
    }
    stem = output_stem(args.output)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with_suffix(stem, ".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, with_suffix(stem, ".png"), f"linear cross-entropy, {result['device']}, {result['dtype']}")
    print(f"wrote {with_suffix(stem, '.json')} and {with_suffix(stem, '.png')}")
    return 0


if __name__ == "__main__":
    if sys.platform.startswith("linux") and any(os.environ.get(k) != v for k, v in _MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_MALLOC_ENV})
    sys.exit(main())
