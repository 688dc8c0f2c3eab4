"""Benchmark ODE-shared models: validation loss and decode latency against the number of solver steps.

Side by side in one run, on the same packed Python-source tokens in the same order:
- `plain`: one shared Llama layer integrated over depth L, trained at L Euler steps (step 1);
- `random`: the same model trained with a random number of steps per batch from {L, L/2, L/4} (robust schedule);
- `fine`: trained at 2L steps (half the step size) over the same interval;
- `llama`: an unshared Llama of L layers, the equal-compute reference at full steps.
Each ODE model is evaluated at num_steps = L, L/2, L/4 (loss on validation blocks, greedy decode latency per token
with a KV cache at batch 1). Writes JSON (device, date, command, versions, every number) and a PNG.

    OMP_NUM_THREADS=1 python scripts/bench_ode.py --preset cpu-small --out scripts/results/ode_cpu_small
    python scripts/bench_ode.py --preset gpu --scope all --out scripts/results/ode_gpu   # >= 20M params, bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_effitrain.data import load_corpus, pack_dataset, train_tokenizer
from hf_effitrain.models.presets import build_model


@dataclass
class BenchConfig:
    hidden_size: int = 64
    num_heads: int = 4
    intermediate_size: int = 172
    depth: int = 8
    vocab_size: int = 2048
    block_size: int = 64
    batch_size: int = 16
    train_steps: int = 200
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    scope: str = "stdlib"
    max_files: int | None = 200
    eval_blocks: int = 32
    decode_prompts: int = 3
    decode_prompt_tokens: int = 32
    decode_new_tokens: int = 16
    schedules: str = "plain,random,fine,llama"
    dtype: str = "float32"
    seed: int = 0


PRESETS = {
    "cpu-small": BenchConfig(),
    # GPU scale: one shared layer of hidden 768 over depth 8 is 22M params with the 8192-token vocabulary.
    "gpu": BenchConfig(hidden_size=768, num_heads=12, intermediate_size=3072, depth=8, vocab_size=8192, block_size=512,
                       batch_size=32, train_steps=1800, learning_rate=1e-3, warmup_steps=100, scope="all",
                       max_files=None, eval_blocks=256, decode_prompts=16, decode_new_tokens=64, dtype="bfloat16"),
}


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--out", default="scripts/results/ode_cpu_small", help="output prefix: writes <out>.json and <out>.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name, value in asdict(BenchConfig()).items():
        kind = int if name in ("max_files",) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"override the preset's {name}")
    args = parser.parse_args(argv)
    config = PRESETS[args.preset]
    overrides = {k: v for k, v in vars(args).items() if k in asdict(config) and v is not None}
    config = BenchConfig(**{**asdict(config), **overrides})
    if config.depth % 4:
        raise ValueError(f"--depth must be a multiple of 4 (steps L, L/2, L/4 are evaluated), got {config.depth}.")
    return config, args


def prepare_data(config: BenchConfig):
    corpus = load_corpus("python", scope=config.scope, max_files=config.max_files)
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size)
    train = pack_dataset(corpus["train"], tokenizer, config.block_size)
    validation = pack_dataset(corpus["validation"], tokenizer, config.block_size)
    validation = validation.select(range(min(config.eval_blocks, len(validation))))
    return tokenizer, train, validation


def build(schedule: str, config: BenchConfig, tokenizer):
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=max(1024, config.block_size), hidden_size=config.hidden_size,
                  num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads, intermediate_size=config.intermediate_size,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=config.seed)
    depth = config.depth
    if schedule == "llama":
        return build_model("tiny", "llama", num_hidden_layers=depth, **common)
    ode = dict(num_steps=depth, ode_interval=float(depth), train_step_seed=config.seed)
    if schedule == "random":
        ode.update(train_step_schedule="random", train_num_steps_choices=[depth, depth // 2, depth // 4])
    elif schedule == "fine":
        ode.update(train_num_steps=2 * depth)
    elif schedule != "plain":
        raise ValueError(f"Unknown schedule {schedule!r}; valid: plain, random, fine, llama.")
    return build_model("tiny", "ode_shared", **common, **ode)


def train(model, config: BenchConfig, train_data, tokenizer, device: str, output_dir: Path) -> dict:
    arguments = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=config.batch_size, max_steps=config.train_steps,
        learning_rate=config.learning_rate, warmup_steps=config.warmup_steps, lr_scheduler_type="cosine", weight_decay=0.1,
        logging_steps=max(1, config.train_steps // 10), save_strategy="no", report_to=[], seed=config.seed,
        data_seed=config.seed, use_cpu=device == "cpu", bf16=config.dtype == "bfloat16", dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=train_data, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    start = time.perf_counter()
    result = trainer.train()
    return {"train_seconds": time.perf_counter() - start, "train_loss": result.training_loss,
            "tokens": config.train_steps * config.batch_size * config.block_size}


@torch.no_grad()
def validation_loss(model, validation, device: str, num_steps: int | None, batch_size: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(validation), batch_size):
        ids = torch.tensor(validation[start : start + batch_size]["input_ids"], device=device)
        kwargs = {} if num_steps is None else {"num_steps": num_steps}
        logits = model(ids, use_cache=False, **kwargs).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total, count = total + loss.item(), count + ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def decode_ms_per_token(model, validation, config: BenchConfig, device: str, num_steps: int | None) -> float:
    """Median over prompts of greedy-decode wall time per new token (batch 1, KV cache), after one warm-up call."""
    kwargs = {} if num_steps is None else {"num_steps": num_steps}
    prompts = [torch.tensor([row[: config.decode_prompt_tokens]], device=device) for row in validation[: config.decode_prompts]["input_ids"]]
    generate = dict(max_new_tokens=config.decode_new_tokens, min_new_tokens=config.decode_new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
    model.generate(prompts[0], **generate, **kwargs)
    timings = []
    for prompt in prompts:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, **generate, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append((time.perf_counter() - start) * 1000 / config.decode_new_tokens)
    return statistics.median(timings)


def evaluate(schedule: str, model, config: BenchConfig, validation, device: str) -> list[dict]:
    steps_list = [None] if schedule == "llama" else [config.depth, config.depth // 2, config.depth // 4]
    if schedule == "fine":
        steps_list.insert(0, 2 * config.depth)  # the steps it was trained at
    rows = []
    for steps in steps_list:
        layer_evals = config.depth if steps is None else steps  # one shared layer per Euler step
        rows.append({
            "num_steps": steps if steps is not None else config.depth,
            "layer_evaluations_per_token": layer_evals,
            "relative_layer_compute": layer_evals / config.depth,
            "validation_loss": validation_loss(model, validation, device, steps),
            "decode_ms_per_token": decode_ms_per_token(model, validation, config, device, steps),
        })
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in results["runs"].items():
        steps = [row["num_steps"] for row in run["eval"]]
        style = dict(marker="*", markersize=14, linestyle="none") if name == "llama" else dict(marker="o")
        label = f"llama ({results['config']['depth']} layers)" if name == "llama" else f"ode {name}"
        loss_ax.plot(steps, [row["validation_loss"] for row in run["eval"]], label=label, **style)
        time_ax.plot(steps, [row["decode_ms_per_token"] for row in run["eval"]], label=label, **style)
    for ax, ylabel in ((loss_ax, "validation loss"), (time_ax, "greedy decode ms / token (median)")):
        ax.set_xlabel("solver steps at inference (layer evaluations)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"ODE-shared: loss and latency vs steps ({results['device']}, {results['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def versions() -> dict:
    import datasets
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__}


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    torch.manual_seed(config.seed)
    device = args.device
    dtype = getattr(torch, config.dtype)
    tokenizer, train_data, validation = prepare_data(config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    results = {
        "benchmark": "ode_shared", "device": device_name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "versions": versions(), "config": asdict(config),
        "data": {"train_blocks": len(train_data), "validation_blocks": len(validation), "vocab_size": len(tokenizer)}, "runs": {},
    }
    for schedule in config.schedules.split(","):
        model = build(schedule, config, tokenizer).to(device)
        run = {"parameters": sum(p.numel() for p in model.parameters())}
        with tempfile.TemporaryDirectory() as scratch:  # Trainer wants an output_dir; nothing is kept
            run.update(train(model, config, train_data, tokenizer, device, Path(scratch)))
        model = model.to(dtype)
        run["eval"] = evaluate(schedule, model, config, validation, device)
        results["runs"][schedule] = run
        print(json.dumps({schedule: run}, indent=1), flush=True)
    plain_full = results["runs"].get("plain", {}).get("eval", [{}])[0].get("validation_loss")
    if plain_full is not None:
        for run in results["runs"].values():
            for row in run["eval"]:
                row["loss_vs_plain_full_steps_pct"] = 100 * (row["validation_loss"] / plain_full - 1)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
