"""Benchmark of MSN fine-tuning + exact Jacobi / TR-Jacobi decoding against the stock alternatives.

One run, side by side:
1. pre-train a code model on the local Python source corpus (token-level, stock `Trainer`);
2. fine-tune it twice on the code SFT set (signature + docstring -> body), same steps and data order:
   plain SFT (`noise_length=0`) and MSN (`noise_length=L`), both with `NoisySFTTrainer`; record their clean
   validation losses;
3. on HumanEval prompts (`--humaneval`, the 164-prompt jsonl.gz) and held-out corpus prompts (the SFT test split:
   files never trained on), decode greedily with every method on both models:
   `greedy` (`generate`), `static_greedy` (`cache_implementation="static"`), `prompt_lookup`
   (`prompt_lookup_num_tokens`), `jacobi` and `tr_jacobi` (this package);
   per prompt: new tokens, model forwards (counted by a forward hook, the same way for every method), wall-clock,
   and whether the output equals greedy's token for token. By default every method generates exactly
   `max_new_tokens` (EOS off, so that all methods decode the same length); `--stop_at_eos` stops at EOS.
Writes JSON (device, date, command, versions, every number) and a PNG.

    OMP_NUM_THREADS=2 python scripts/bench_decode.py --size cpu_small --humaneval ../shared/data/HumanEval.jsonl.gz
    python scripts/bench_decode.py --size gpu --bf16 --humaneval ../shared/data/HumanEval.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import datasets
import torch
import transformers
import trl
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_effitrain.data import build_code_sft_dataset, load_corpus, pack_dataset, train_tokenizer
from hf_effitrain.hub.generation_effi import generate as effi_generate
from hf_effitrain.models.presets import build_model
from hf_effitrain.training.noisy_sft_config import NoisySFTConfig
from hf_effitrain.training.noisy_sft_trainer import NoisySFTTrainer
from hf_effitrain.training.pretrain import parse_config_overrides

logger = logging.getLogger("bench_decode")

SIZES = {
    "cpu_small": dict(
        preset="tiny", config_overrides="hidden_size=64,intermediate_size=176,num_attention_heads=4,num_key_value_heads=4",
        scope="stdlib", max_files=None, vocab_size=1024, block_size=128, pretrain_steps=600, pretrain_batch=16,
        pretrain_lr=3e-3, sft_steps=200, sft_batch=8, sft_lr=1e-3, sft_max_length=192, humaneval_prompts=16,
        corpus_prompts=16, max_new_tokens=64, repeats=3,
    ),
    "gpu": dict(
        # small preset with 8 layers: 33.7M parameters at vocab 8192 (the issue asks for >= 30M)
        preset="small", config_overrides="num_hidden_layers=8", scope="all", max_files=None, vocab_size=8192, block_size=512,
        pretrain_steps=6000, pretrain_batch=32, pretrain_lr=1e-3, sft_steps=1500, sft_batch=16, sft_lr=3e-4,
        sft_max_length=768, humaneval_prompts=164, corpus_prompts=100, max_new_tokens=128, repeats=2,
    ),
}
METHODS = ("greedy", "static_greedy", "prompt_lookup", "jacobi", "tr_jacobi")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu_small")
    parser.add_argument("--humaneval", default=None, help="Path of HumanEval.jsonl.gz (164 prompts); omit to skip.")
    parser.add_argument("--architecture", default="llama")
    parser.add_argument("--noise_length", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="Train and decode in bfloat16 (GPU).")
    parser.add_argument("--stop_at_eos", action="store_true",
                        help="Stop at EOS (default: every method generates exactly max_new_tokens, eos_token_id=None).")
    parser.add_argument("--out", default=None, help="Output path without extension (default scripts/results/decode_<size>).")
    parser.add_argument("--work_dir", default=None, help="Folder for checkpoints (default: a temp folder).")
    for key, value in SIZES["cpu_small"].items():
        parser.add_argument(f"--{key}", type=type(value) if value is not None else int, default=None,
                            help=f"override the size preset's value (cpu_small: {value})")
    args = parser.parse_args(argv)
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.max_files = args.max_files or None  # 0 = every file
    args.out = args.out or f"scripts/results/decode_{args.size}"
    if args.noise_length < 1:
        parser.error(f"--noise_length must be >= 1 (the MSN run), got {args.noise_length}")
    return args


def _train_args(out: Path, args, **kw) -> dict:
    return dict(
        output_dir=str(out), report_to="none", save_strategy="no", logging_steps=25, bf16=args.bf16,
        dataloader_num_workers=0, seed=0, warmup_steps=max(1, kw.get("max_steps", 100) // 20), lr_scheduler_type="cosine", **kw,
    )


def pretrain(args, corpus, tokenizer, work: Path):
    """A token-level code model pre-trained with the stock `Trainer` on packed corpus blocks."""
    blocks = pack_dataset(corpus["train"], tokenizer, args.block_size)
    model = build_model(
        args.preset, args.architecture, vocab_size=len(tokenizer), max_position_embeddings=max(1024, args.sft_max_length + args.max_new_tokens),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        seed=0, **parse_config_overrides(args.config_overrides),
    )
    targs = TrainingArguments(**_train_args(work / "pretrain", args, max_steps=args.pretrain_steps,
                                            per_device_train_batch_size=args.pretrain_batch, learning_rate=args.pretrain_lr))
    trainer = Trainer(model=model, args=targs, train_dataset=blocks, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    start = time.perf_counter()
    trainer.train()
    logger.info("pre-trained %d params for %d steps in %.0fs", model.num_parameters(), args.pretrain_steps, time.perf_counter() - start)
    trainer.save_model()
    return work / "pretrain"


def fine_tune(args, pretrained: Path, tokenizer, sft, noise_length: int, work: Path):
    """Plain SFT (noise_length=0) or MSN from the same checkpoint, same data order and steps; returns (model, eval loss).

    The model returned is reloaded from the saved checkpoint: the trained in-memory model keeps trl's fused-LM-head
    forward wrapper, which is not what a user decodes with.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(pretrained)
    config = NoisySFTConfig(**_train_args(
        work / f"sft_L{noise_length}", args, max_steps=args.sft_steps, per_device_train_batch_size=args.sft_batch,
        per_device_eval_batch_size=args.sft_batch, learning_rate=args.sft_lr, max_length=args.sft_max_length,
        gradient_checkpointing=False, noise_length=noise_length, use_cpu=not torch.cuda.is_available(),
    ))
    held_out = datasets.concatenate_datasets([sft["validation"], sft["test"]])  # functions of files never trained on
    if len(held_out) == 0:
        raise ValueError("The code SFT set has no held-out functions at this corpus size; raise --max_files (0 = all files).")
    trainer = NoisySFTTrainer(model=model, args=config, train_dataset=sft["train"], eval_dataset=held_out, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    logger.info("SFT noise_length=%d: eval loss %.4f (%.0fs)", noise_length, loss, time.perf_counter() - start)
    trainer.save_model()  # decode from the saved checkpoint, as a user would (not trl's training-time forward wrapper)
    return transformers.AutoModelForCausalLM.from_pretrained(config.output_dir).eval(), loss


def load_prompts(args, sft) -> list[dict]:
    prompts = []
    if args.humaneval:
        with gzip.open(args.humaneval, "rt") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        # without the trailing newline, like the code SFT prompts: the BPE merges a newline with the indentation after
        # it, so a prompt ending in a bare newline ends in a token the model never saw there
        prompts += [
            {"source": "humaneval", "id": r["task_id"], "text": r["prompt"].rstrip("\n")} for r in rows[: args.humaneval_prompts]
        ]
    test = sft["test"]
    prompts += [{"source": "corpus", "id": f"{r['path']}::{r['name']}", "text": r["prompt"]} for r in test.select(range(min(args.corpus_prompts, len(test))))]
    return prompts


class ForwardCounter:
    """Counts top-level forwards of a model (every method is measured the same way)."""

    def __init__(self, model):
        self.count = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.count += 1


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode(model, ids, method: str, max_new_tokens: int, pad_id: int, stop_at_eos: bool = False):
    common = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    if not stop_at_eos:
        common["eos_token_id"] = None
    if method == "greedy":
        return model.generate(ids, **common)
    if method == "static_greedy":
        return model.generate(ids, cache_implementation="static", **common)
    if method == "prompt_lookup":
        return model.generate(ids, prompt_lookup_num_tokens=10, max_matching_ngram_size=3, **common)
    return effi_generate(model, ids, strategy=method, **common)


def measure(model, tokenizer, prompts, args) -> dict:
    """Per method: per-prompt tokens, forwards, seconds, agreement with greedy; plus the totals.

    Methods are interleaved prompt by prompt (greedy first), so that a change in machine load hits all of them alike,
    and each (prompt, method) time is the minimum of `--repeats` runs.
    """
    counter = ForwardCounter(model)
    encoded = [tokenizer(p["text"], return_tensors="pt")["input_ids"].to(model.device) for p in prompts]
    rows = {method: [] for method in METHODS}
    # warm-up on the longest prompt at full length: the allocator, and static-cache greedy's cache (sized to the
    # longest call so far) and auto-compiled forward on CUDA reach their final shapes here, not inside a timed call
    longest = max(encoded, key=lambda ids: ids.shape[1])
    for method in METHODS:
        decode(model, longest, method, args.max_new_tokens, tokenizer.pad_token_id, args.stop_at_eos)
    for i, ids in enumerate(encoded):
        reference = None
        for method in METHODS:
            timings = []
            for _ in range(args.repeats):  # the minimum over repeats: robust to bursts of load from other jobs
                counter.count = 0
                _sync()
                start = time.perf_counter()
                with torch.inference_mode():
                    out = decode(model, ids, method, args.max_new_tokens, tokenizer.pad_token_id, args.stop_at_eos)
                _sync()
                timings.append(time.perf_counter() - start)
            seconds = min(timings)
            new = out[0, ids.shape[1] :]
            reference = new if reference is None else reference  # METHODS[0] is greedy
            rows[method].append({
                "prompt": prompts[i]["id"], "source": prompts[i]["source"], "new_tokens": int(new.numel()),
                "forwards": counter.count, "seconds": seconds, "agrees_with_greedy": bool(torch.equal(new, reference)),
            })
    results = {}
    for method in METHODS:
        tokens, seconds = sum(r["new_tokens"] for r in rows[method]), sum(r["seconds"] for r in rows[method])
        results[method] = {
            "tokens_per_second": tokens / seconds,
            "tokens_per_forward": tokens / max(1, sum(r["forwards"] for r in rows[method])),
            "agreement": sum(r["agrees_with_greedy"] for r in rows[method]) / len(rows[method]),
            "total_seconds": seconds,
            "per_prompt": rows[method],
        }
        results[method]["speedup_vs_greedy"] = results[method]["tokens_per_second"] / (
            sum(r["new_tokens"] for r in rows["greedy"]) / sum(r["seconds"] for r in rows["greedy"])
        )
        logger.info("%-14s %.1f tok/s (%.2fx greedy), %.2f tokens/forward, agreement %.2f", method,
                    results[method]["tokens_per_second"], results[method]["speedup_vs_greedy"],
                    results[method]["tokens_per_forward"], results[method]["agreement"])
    return results


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    models = list(report["decoding"])
    width = 0.8 / len(models)
    for m, name in enumerate(models):
        for ax, key in zip(axes, ("speedup_vs_greedy", "tokens_per_forward")):
            values = [report["decoding"][name][method][key] for method in METHODS]
            ax.bar([i + m * width for i in range(len(METHODS))], values, width, label=name)
    for ax, title in zip(axes, ("wall-clock speedup over greedy generate", "new tokens per forward")):
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(METHODS))], METHODS, rotation=20)
        ax.set_title(title)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend()
    loss = report["validation_loss"]
    fig.suptitle(f"{report['device']} | val loss SFT {loss['sft']:.3f} vs MSN {loss['msn']:.3f} | {report['config']['size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning()
    torch.manual_seed(0)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_decode_"))
    corpus = load_corpus("python", scope=args.scope, max_files=args.max_files)
    tokenizer = train_tokenizer(corpus, vocab_size=args.vocab_size)
    sft = build_code_sft_dataset("python", scope=args.scope, max_files=args.max_files)
    pretrained = pretrain(args, corpus, tokenizer, work)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    prompts = load_prompts(args, sft)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__, "python": platform.python_version()},
        "config": vars(args), "dtype": str(dtype), "num_prompts": {"humaneval": sum(p["source"] == "humaneval" for p in prompts), "corpus": sum(p["source"] == "corpus" for p in prompts)},
        "validation_loss": {}, "decoding": {},
        "note": "CPU timings are noisy: the cores are shared with other jobs." if device == "cpu" else "",
    }
    for name, noise_length in (("sft", 0), ("msn", args.noise_length)):
        model, loss = fine_tune(args, pretrained, tokenizer, sft, noise_length, work)
        report["validation_loss"][name] = loss
        report["parameters"] = model.num_parameters()
        report["decoding"][name] = measure(model.to(device=device, dtype=dtype), tokenizer, prompts, args)
    report["validation_loss"]["msn_over_sft"] = report["validation_loss"]["msn"] / report["validation_loss"]["sft"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    summary = {name: {m: {k: round(v[k], 3) for k in ("speedup_vs_greedy", "tokens_per_forward", "agreement")} for m, v in res.items()} for name, res in report["decoding"].items()}
    print(json.dumps({"validation_loss": report["validation_loss"], "decoding": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
