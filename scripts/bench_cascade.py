"""Benchmark of cascade-aware training (CAT): deferral curves of a standard small model vs CAT variants.

One run, side by side:
1. pre-train a small and a large causal LM on the Python source corpus (same tokenizer, same blocks);
2. fine-tune the pre-trained small model with every loss preset (`standard` = plain cross-entropy, the baseline,
   and the CAT variants), each on the same data for the same number of steps, the large model frozen;
3. evaluate each cascade (fine-tuned small -> large) on held-out blocks: quality (next-token accuracy) against
   deferral ratio and against relative FLOPs, token level and sequence level (Chow-Average), the areas under the
   curves, and the FLOPs saved at the large model's quality minus 1%;
4. write JSON (device, date, command, versions, every number) and a PNG.

CPU smoke size (about 5-8 minutes on 2 shared cores):
    OMP_NUM_THREADS=2 python scripts/bench_cascade.py --size cpu_small
GPU size (small about 8M, large about 90M parameters, `all` corpus scope):
    python scripts/bench_cascade.py --size gpu
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_effitrain.cascade import LOSS_PRESETS, deferral_curve, plot_deferral_curves, summarize_curves
from hf_effitrain.data import load_corpus, pack_dataset, train_tokenizer
from hf_effitrain.hub.modeling_cascade import CascadeForCausalLM
from hf_effitrain.models.presets import build_model
from hf_effitrain.training.cascade_config import CascadeAwareTrainingArguments
from hf_effitrain.training.cascade_trainer import CascadeAwareTrainer

logger = logging.getLogger("bench_cascade")

# name -> settings; model sizes are (hidden, layers, heads, intermediate)
SIZES = {
    "cpu_small": dict(
        scope="stdlib", max_files=400, vocab_size=2048, block_size=128, batch_size=16,
        small=(64, 2, 4, 176), large=(256, 4, 4, 688),
        small_pretrain_steps=300, large_pretrain_steps=300, finetune_steps=120, learning_rate=3e-3,
        eval_blocks=85, num_points=21,
    ),
    "gpu": dict(
        scope="all", max_files=None, vocab_size=8192, block_size=512, batch_size=32,
        small=(256, 6, 4, 688), large=(768, 12, 12, 2048),
        small_pretrain_steps=4000, large_pretrain_steps=4000, finetune_steps=2000, learning_rate=1e-3,
        eval_blocks=512, num_points=41,
    ),
}


def _model(dims, tokenizer, architecture: str, seed: int):
    hidden, layers, heads, intermediate = dims
    return build_model(
        "tiny", architecture, seed=seed, vocab_size=len(tokenizer), max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        intermediate_size=intermediate,
    )


def _common_args(out: str, steps: int, cfg: dict, seed: int) -> dict:
    return dict(
        output_dir=out, max_steps=steps, per_device_train_batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"],
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.1, logging_steps=max(1, steps // 10),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def pretrain(model, train, collator, steps, cfg, seed, workdir) -> tuple[float, float]:
    args = TrainingArguments(**_common_args(workdir, steps, cfg, seed))
    start = time.perf_counter()
    result = Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()
    return float(result.training_loss), time.perf_counter() - start


def finetune(small_state, cfg, preset, large, train, collator, tokenizer, architecture, seed, workdir):
    small = _model(cfg["small"], tokenizer, architecture, seed)
    small.load_state_dict(small_state)
    args = CascadeAwareTrainingArguments(
        **_common_args(workdir, cfg["finetune_steps"], {**cfg, "learning_rate": cfg["learning_rate"] / 3}, seed + 1),
        cascade_preset=preset,
        precompute_large_predictions=not LOSS_PRESETS[preset].needs_large_logits and LOSS_PRESETS[preset].needs_large_predictions,
    )
    trainer = CascadeAwareTrainer(
        model=small, args=args, large_model=large if not LOSS_PRESETS[preset].is_standard else None,
        train_dataset=train, data_collator=collator, processing_class=tokenizer,
    )
    start = time.perf_counter()
    result = trainer.train()
    return trainer.model.eval(), float(result.training_loss), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu_small")
    parser.add_argument("--architecture", default="llama", choices=("llama", "qwen2", "mistral"))
    parser.add_argument("--presets", default=",".join(LOSS_PRESETS), help="comma-separated loss presets; 'standard' is the baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune_steps", type=int, default=None, help="override the size's fine-tuning steps")
    parser.add_argument("--pretrain_steps", type=int, default=None, help="override both models' pre-training steps")
    parser.add_argument("--output", default="scripts/results/cascade_cpu_small", help="path prefix of the .json and .png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning()
    cfg = dict(SIZES[args.size])
    if args.finetune_steps is not None:
        cfg["finetune_steps"] = args.finetune_steps
    if args.pretrain_steps is not None:
        cfg["small_pretrain_steps"] = cfg["large_pretrain_steps"] = args.pretrain_steps
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in LOSS_PRESETS]
    if unknown or "standard" not in presets:
        parser.error(f"--presets must include 'standard' and only names of {sorted(LOSS_PRESETS)}; got {presets}")
    wall = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    corpus = load_corpus("python", scope=cfg["scope"], max_files=cfg["max_files"])
    tokenizer = train_tokenizer(corpus, vocab_size=cfg["vocab_size"])
    packed = pack_dataset(corpus, tokenizer, cfg["block_size"])
    train = packed["train"].shuffle(seed=args.seed)
    validation = packed["validation"].select(range(min(cfg["eval_blocks"], len(packed["validation"]))))
    eval_rows = torch.tensor(validation["input_ids"])
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    logger.info("train blocks %d, eval blocks %d", len(train), len(validation))

    results: dict = {"pretrain": {}, "finetune": {}}
    with tempfile.TemporaryDirectory() as tmp:
        small = _model(cfg["small"], tokenizer, args.architecture, args.seed)
        large = _model(cfg["large"], tokenizer, args.architecture, args.seed + 100)
        for name, model, steps in (("small", small, cfg["small_pretrain_steps"]), ("large", large, cfg["large_pretrain_steps"])):
            loss, seconds = pretrain(model, train, collator, steps, cfg, args.seed, os.path.join(tmp, name))
            results["pretrain"][name] = {
                "parameters": sum(p.numel() for p in model.parameters()), "steps": steps, "train_loss": loss, "seconds": seconds,
            }
            logger.info("pre-trained %s: loss %.3f in %.0fs", name, loss, seconds)
        large.eval()
        small_state = {k: v.detach().clone() for k, v in small.state_dict().items()}
        # the fine-tuning data: one epoch of the same blocks, in the same order, for every preset
        finetune_data = train.select(range(min(len(train), cfg["finetune_steps"] * cfg["batch_size"])))

        curves = {"token": {}, "sequence": {}}
        for preset in presets:
            tuned, loss, seconds = finetune(
                small_state, cfg, preset, large, finetune_data, collator, tokenizer, args.architecture, args.seed,
                os.path.join(tmp, preset),
            )
            cascade = CascadeForCausalLM.from_models(tuned.to(device), large.to(device), rule="chow_average")
            for level in curves:
                curves[level][preset] = deferral_curve(
                    cascade, eval_rows, metric="token_accuracy", level=level, num_points=cfg["num_points"], batch_size=8
                )
            results["finetune"][preset] = {
                "weights": asdict(LOSS_PRESETS[preset]), "steps": cfg["finetune_steps"], "train_loss": loss, "seconds": seconds,
                "small_token_accuracy": curves["token"][preset].small_quality,
                "small_token_loss": deferral_curve(cascade, eval_rows, metric="token_loss", level="token", num_points=2).small_quality,
            }
            logger.info("fine-tuned %s: train loss %.3f, area %.4f", preset, loss, curves["token"][preset].area)

    summary = {level: summarize_curves(c, baseline="standard") for level, c in curves.items()}
    best = max((p for p in presets if p != "standard"), key=lambda p: summary["token"][p]["area"], default="standard")
    png = Path(args.output + ".png")
    plot_deferral_curves(curves["token"], png, title=f"CAT vs standard fine-tuning, token-level deferral ({args.size}, {device})")
    seq_png = Path(args.output + "_sequence.png")
    plot_deferral_curves(curves["sequence"], seq_png, title=f"CAT vs standard, sequence-level Chow-Average ({args.size}, {device})")
    report = {
        "benchmark": "cascade-aware training: deferral curves, CAT variants vs standard fine-tuning",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, shared)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "size": args.size,
        "config": cfg,
        "metric": "next-token accuracy on held-out validation blocks (teacher forced)",
        "results": results,
        "summary": summary,
        "best_cat_preset_by_token_area": best,
        "best_gain_in_token_area_vs_standard": summary["token"].get(best, {}).get("area_gain_vs_standard"),
        "curves": {level: {p: c.to_dict() for p, c in cs.items()} for level, cs in curves.items()},
        "wall_seconds": time.perf_counter() - wall,
        "plots": [str(png), str(seq_png)],
    }
    Path(args.output + ".json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"summary": summary, "best": best, "wall_seconds": report["wall_seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
