"""Benchmark ODE-shared models: validation loss and decode latency against the number of solver steps.

Side by side in one run, on the same packed Python-source tokens in the same order (schedules from `--schedules`):
- `plain`: one shared Llama layer integrated over depth L, trained at L Euler steps (step 1);
- `random`: the same model trained with a random number of steps per batch from {L, L/2, L/4} (robust schedule);
- `aware_random`: the random schedule with a step-aware block (`step_aware=True`: the shared layer conditioned on
  its depth t and step size h, zero-initialised);
- `aware_consistency`: `aware_random` plus the step-consistency term (`consistency_weight`: one step of 2h trained
  towards the stop-gradient state after two steps of h);
- `fine`: trained at 2L steps (half the step size) over the same interval;
- `llama`: an unshared Llama of L layers, the equal-compute reference at full steps.
Each ODE model is evaluated at num_steps = L, L/2, L/4 (loss on validation blocks, greedy decode latency per token
with a KV cache at batch 1); every `eval_every` optimizer steps the validation loss at L and L/2 steps is recorded
(the loss curves). The summary checks the goal: at L/2 steps within 1% of the same model at L steps, with the loss
at L steps no worse than `plain`'s. Writes JSON (device, date, command, versions, git commit, every number) and a PNG.

    OMP_NUM_THREADS=2 python scripts/bench_ode.py --size cpu-small --output scripts/results/ode_cpu_small_steps
    python scripts/bench_ode.py --size gpu --output scripts/results/ode_gpu   # >= 20M params, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from bench_common import add_common_arguments, output_stem, run_record, with_suffix
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

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
    schedules: str = "plain,random,aware_random,aware_consistency,llama"
    consistency_weight: float = 1.0
    consistency_samples: int = 1
    step_embedding_dim: int = 32
    eval_every: int = 100
    curve_blocks: int = 16
    dtype: str = "float32"
    seed: int = 0


SCHEDULES = ("plain", "random", "aware_random", "aware_consistency", "fine", "llama")

PRESETS = {
    # 600 steps: the plain model leaves its unigram plateau (near loss 6.3) after ~100 steps at this size.
    "cpu-small": BenchConfig(train_steps=600),
    # GPU scale: one shared layer of hidden 768 over depth 8 is 22M params with the 8192-token vocabulary.
    "gpu": BenchConfig(
        hidden_size=768,
        num_heads=12,
        intermediate_size=3072,
        depth=8,
        vocab_size=8192,
        block_size=512,
        batch_size=32,
        train_steps=1800,
        learning_rate=1e-3,
        warmup_steps=100,
        scope="all",
        max_files=None,
        eval_blocks=256,
        decode_prompts=16,
        decode_new_tokens=64,
        dtype="bfloat16",
        eval_every=300,
        curve_blocks=64,
    ),
}


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        parser,
        PRESETS,
        "cpu-small",
        "scripts/results/ode_cpu_small",
        size_aliases=("--preset",),
        output_aliases=("--out",),
        device_default="cuda" if torch.cuda.is_available() else "cpu",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="combine the runs of these result files (same config, "
        "run in parallel processes with disjoint --schedules) into --output (JSON + PNG); trains nothing",
    )
    for name, value in asdict(BenchConfig()).items():
        kind = int if name in ("max_files",) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"override the size's {name}")
    args = parser.parse_args(argv)
    config = PRESETS[args.size]
    overrides = {k: v for k, v in vars(args).items() if k in asdict(config) and v is not None}
    config = BenchConfig(**{**asdict(config), **overrides})
    if config.depth % 4:
        raise ValueError(f"--depth must be a multiple of 4 (steps L, L/2, L/4 are evaluated), got {config.depth}.")
    unknown = [name for name in config.schedules.split(",") if name not in SCHEDULES]
    if unknown:
        raise ValueError(f"Unknown schedule(s) {unknown} in --schedules; valid: {', '.join(SCHEDULES)}.")
    return config, args


def prepare_data(config: BenchConfig):
    corpus = load_corpus("python", scope=config.scope, max_files=config.max_files)
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size)
    train = pack_dataset(corpus["train"], tokenizer, config.block_size)
    validation = pack_dataset(corpus["validation"], tokenizer, config.block_size)
    validation = validation.select(range(min(config.eval_blocks, len(validation))))
    return tokenizer, train, validation


def build(schedule: str, config: BenchConfig, tokenizer):
    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=max(1024, config.block_size),
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=config.seed,
    )
    depth = config.depth
    if schedule == "llama":
        return build_model("tiny", "llama", num_hidden_layers=depth, **common)
    ode = dict(num_steps=depth, ode_interval=float(depth), train_step_seed=config.seed)
    if schedule in ("random", "aware_random", "aware_consistency"):
        ode.update(train_step_schedule="random", train_num_steps_choices=[depth, depth // 2, depth // 4])
    if schedule in ("aware_random", "aware_consistency"):
        ode.update(step_aware=True, step_embedding_dim=config.step_embedding_dim)
    if schedule == "aware_consistency":
        ode.update(consistency_weight=config.consistency_weight, consistency_samples=config.consistency_samples)
    elif schedule == "fine":
        ode.update(train_num_steps=2 * depth)
    elif schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}.")
    return build_model("tiny", "ode_shared", **common, **ode)


class LossCurve(TrainerCallback):
    """Validation loss at L and L/2 steps (L layers / the Llama itself) every `eval_every` optimizer steps."""

    def __init__(self, model, validation, config: BenchConfig, device: str, schedule: str):
        self.model, self.validation, self.config, self.device = model, validation, config, device
        self.steps = [None] if schedule == "llama" else [config.depth, config.depth // 2]
        self.points: list[dict] = []

    def record(self, step: int) -> None:
        point = {"step": step, "tokens": step * self.config.batch_size * self.config.block_size}
        for steps in self.steps:
            key = "validation_loss" if steps is None else f"validation_loss_{steps}_steps"
            point[key] = validation_loss(self.model, self.validation, self.device, steps)
        self.model.train()
        self.points.append(point)

    def on_train_begin(self, args, state, control, **kwargs):
        self.record(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.config.eval_every == 0 or state.global_step == state.max_steps:
            self.record(state.global_step)


def train(model, config: BenchConfig, train_data, tokenizer, device: str, output_dir: Path, curve: LossCurve) -> dict:
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        max_steps=config.train_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        logging_steps=max(1, config.train_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=device == "cpu",
        bf16=config.dtype == "bfloat16",
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=train_data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[curve],
    )
    start = time.perf_counter()
    result = trainer.train()
    train_log = [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    return {
        "train_seconds": time.perf_counter() - start,
        "train_loss": result.training_loss,
        "tokens": config.train_steps * config.batch_size * config.block_size,
        "train_log": train_log,
        "curve": curve.points,
    }


@torch.no_grad()
def validation_loss(model, validation, device: str, num_steps: int | None, batch_size: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(validation), batch_size):
        ids = torch.tensor(validation[start : start + batch_size]["input_ids"], device=device)
        kwargs = {} if num_steps is None else {"num_steps": num_steps}
        logits = model(ids, use_cache=False, **kwargs).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + loss.item(), count + ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def decode_ms_per_token(model, validation, config: BenchConfig, device: str, num_steps: int | None) -> float:
    """Median over prompts of greedy-decode wall time per new token (batch 1, KV cache), after one warm-up call."""
    kwargs = {} if num_steps is None else {"num_steps": num_steps}
    prompts = [
        torch.tensor([row[: config.decode_prompt_tokens]], device=device)
        for row in validation[: config.decode_prompts]["input_ids"]
    ]
    generate = dict(
        max_new_tokens=config.decode_new_tokens,
        min_new_tokens=config.decode_new_tokens,
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
    )
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
        rows.append(
            {
                "num_steps": steps if steps is not None else config.depth,
                "layer_evaluations_per_token": layer_evals,
                "relative_layer_compute": layer_evals / config.depth,
                "validation_loss": validation_loss(model, validation, device, steps),
                "decode_ms_per_token": decode_ms_per_token(model, validation, config, device, steps),
            }
        )
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve_ax, loss_ax, time_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    depth = results["config"]["depth"]
    for index, (name, run) in enumerate(results["runs"].items()):
        color = f"C{index}"
        steps = [row["num_steps"] for row in run["eval"]]
        style = dict(marker="*", markersize=14, linestyle="none") if name == "llama" else dict(marker="o")
        label = f"llama ({depth} layers)" if name == "llama" else f"ode {name}"
        loss_ax.plot(steps, [row["validation_loss"] for row in run["eval"]], label=label, color=color, **style)
        time_ax.plot(steps, [row["decode_ms_per_token"] for row in run["eval"]], label=label, color=color, **style)
        tokens = [point["tokens"] / 1e6 for point in run["curve"]]
        for key, line in (
            ("validation_loss", "-"),
            (f"validation_loss_{depth}_steps", "-"),
            (f"validation_loss_{depth // 2}_steps", "--"),
        ):
            if key in run["curve"][0]:
                suffix = "" if key == "validation_loss" else f" @ {key.split('_')[2]} steps"
                curve_ax.plot(
                    tokens, [point[key] for point in run["curve"]], line, color=color, label=f"{label}{suffix}"
                )
    curve_ax.set_xlabel("training tokens (M)")
    curve_ax.set_ylabel(f"validation loss (first {results['config']['curve_blocks']} blocks)")
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize=7)
    for ax, ylabel in ((loss_ax, "validation loss"), (time_ax, "greedy decode ms / token (median)")):
        ax.set_xlabel("solver steps at inference (layer evaluations)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"ODE-shared: loss and latency vs steps ({results['device']}, {results['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_plain_deltas(results: dict) -> None:
    """Every evaluation row's loss change against the plain model at full steps (when a plain run is present)."""
    plain_full = results["runs"].get("plain", {}).get("eval", [{}])[0].get("validation_loss")
    if plain_full is not None:
        for run in results["runs"].values():
            for row in run["eval"]:
                row["loss_vs_plain_full_steps_pct"] = 100 * (row["validation_loss"] / plain_full - 1)


def summarise(results: dict) -> dict:
    """Per schedule: loss at L/2 and L/4 against the same model at L, loss at L against plain's, and the goal."""
    depth = results["config"]["depth"]
    plain_full = next(
        (
            row["validation_loss"]
            for row in results["runs"].get("plain", {}).get("eval", [])
            if row["num_steps"] == depth
        ),
        None,
    )
    summary = {}
    for name, run in results["runs"].items():
        losses = {row["num_steps"]: row["validation_loss"] for row in run["eval"]}
        if name == "llama" or depth // 2 not in losses:
            continue
        entry = {
            "half_steps_vs_full_pct": 100 * (losses[depth // 2] / losses[depth] - 1),
            "quarter_steps_vs_full_pct": 100 * (losses[depth // 4] / losses[depth] - 1),
        }
        if plain_full is not None:
            entry["full_vs_plain_full_pct"] = 100 * (losses[depth] / plain_full - 1)
            entry["goal_met"] = entry["half_steps_vs_full_pct"] <= 1.0 and losses[depth] <= plain_full
        summary[name] = entry
    return summary


def merge(paths: list[str], out: Path) -> dict:
    """One result from several runs of this script that differ only in `schedules` (e.g. run side by side)."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        differing = sorted(k for k in first["config"] if k != "schedules" and part["config"][k] != first["config"][k])
        if differing:
            raise ValueError(
                f"{path} was run with other settings than {paths[0]}: {differing}; only --schedules may differ."
            )
    results = {
        **first,
        "runs": {},
        "merged_from": [
            {"file": path, "command": part["command"], "date": part["date"]} for path, part in zip(paths, parts)
        ],
        "merge_command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
    }
    for part in parts:
        results["runs"].update(part["runs"])
    results["config"] = {**first["config"], "schedules": ",".join(results["runs"])}
    add_plain_deltas(results)
    results["summary"] = summarise(results)
    stem = output_stem(out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with_suffix(stem, ".json").write_text(json.dumps(results, indent=2))
    plot(results, with_suffix(stem, ".png"))
    print(json.dumps({"summary": results["summary"]}, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    if args.merge:
        merge(args.merge, Path(args.output))
        return 0
    torch.manual_seed(config.seed)
    device = args.device
    dtype = getattr(torch, config.dtype)
    tokenizer, train_data, validation = prepare_data(config)
    stem = output_stem(args.output)
    stem.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "benchmark": "ode_shared",
        **run_record(device),
        "size": args.size,
        "threads": torch.get_num_threads(),
        "config": asdict(config),
        "data": {"train_blocks": len(train_data), "validation_blocks": len(validation), "vocab_size": len(tokenizer)},
        "runs": {},
    }
    for schedule in config.schedules.split(","):
        model = build(schedule, config, tokenizer).to(device)
        run = {"parameters": sum(p.numel() for p in model.parameters())}
        curve = LossCurve(
            model, validation.select(range(min(config.curve_blocks, len(validation)))), config, device, schedule
        )
        with tempfile.TemporaryDirectory() as scratch:  # Trainer wants an output_dir; nothing is kept
            run.update(train(model, config, train_data, tokenizer, device, Path(scratch), curve))
        model = model.to(dtype)
        run["eval"] = evaluate(schedule, model, config, validation, device)
        results["runs"][schedule] = run
        print(json.dumps({schedule: run}, indent=1), flush=True)
    add_plain_deltas(results)
    results["summary"] = summarise(results)
    print(json.dumps({"summary": results["summary"]}, indent=1), flush=True)
    with_suffix(stem, ".json").write_text(json.dumps(results, indent=2))
    plot(results, with_suffix(stem, ".png"))
    print(f"wrote {with_suffix(stem, '.json')} and {with_suffix(stem, '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
