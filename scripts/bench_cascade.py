"""Benchmark of cascade-aware training (CAT): deferral curves of a standard small model vs CAT variants.

One run, side by side:
1. pre-train a small and a large causal LM on the Python source corpus (same tokenizer, same blocks);
2. fine-tune the pre-trained small model with every loss preset (`standard` = plain cross-entropy, the baseline,
   and the CAT variants), each on the same data for the same number of steps, the large model frozen;
3. evaluate each cascade (fine-tuned small -> large) on held-out blocks: quality (next-token accuracy) against
   deferral ratio and against relative FLOPs, token level and sequence level (Chow-Average), the areas under the
   curves, and the FLOPs saved at the large model's quality minus 1%;
4. decoded curves (`hf_effitrain.methods.cascade.decoding_curves`) for the standard and the CAT (`paper`) small model:
   quality of greedy continuations of held-out prompts (mean log-prob under the large model; also accuracy against
   the reference tokens) against the share of tokens from the small model, against FLOPs and against wall-clock
   (interleaved with the large model's greedy decoding), for sequence- and token-level cascades, speculative cascades
   (`generate(strategy="speculative_cascade")`, rules chow / diff / opt) and plain speculative decoding with the
   small model as drafter (`assistant_model=`), all at batch size 1, greedy, EOS off;
5. write JSON (device, date, command, versions, git commit, every number) and PNGs.

CPU smoke size (about 5 minutes on one shared core, plus the decoded curves, about 5 minutes per decoded preset on a
loaded box; `--speculative-prompts 0` skips them; more threads oversubscribe a busy machine):
    OMP_NUM_THREADS=1 python scripts/bench_cascade.py --size cpu_small
GPU size (small about 8.9M, large about 97M parameters, `all` corpus scope; decoded curves on 64 prompts):
    python scripts/bench_cascade.py --size gpu
The speculative-cascade run of the README (presets `standard` and `paper` only; about 18 minutes on a loaded
2-core box):
    OMP_NUM_THREADS=1 python scripts/bench_cascade.py --size cpu_small --presets standard,paper \
        --output scripts/results/cascade_cpu_small_speculative
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict

import torch
import transformers
from bench_common import add_common_arguments, option_names, output_stem, run_record, with_suffix
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_effitrain.data import build_code_sft_dataset, load_corpus, pack_dataset, train_tokenizer
from hf_effitrain.hub.modeling_cascade import CascadeForCausalLM
from hf_effitrain.methods.cascade import LOSS_PRESETS, deferral_curve, plot_deferral_curves, summarize_curves
from hf_effitrain.methods.cascade.config import CascadeAwareTrainingArguments
from hf_effitrain.methods.cascade.decoding_curves import DEFAULT_ALPHAS, decoded_curves, plot_decoded_curves
from hf_effitrain.methods.cascade.trainer import CascadeAwareTrainer
from hf_effitrain.models.presets import build_model

logger = logging.getLogger("bench_cascade")

# name -> settings; model sizes are (hidden, layers, heads, intermediate)
SIZES = {
    "cpu_small": dict(
        scope="stdlib",
        max_files=400,
        vocab_size=1024,
        block_size=64,
        batch_size=16,
        small=(32, 2, 4, 88),
        large=(128, 2, 4, 344),
        small_pretrain_steps=700,
        large_pretrain_steps=700,
        finetune_steps=150,
        small_lr=5e-3,
        large_lr=3e-3,
        eval_blocks=128,
        num_points=21,
        exact_match_examples=0,
        speculative_prompts=16,
        prompt_len=32,
        new_tokens=32,
        draft_len=4,
        decoded_points=7,
    ),
    "gpu": dict(
        scope="all",
        max_files=None,
        vocab_size=8192,
        block_size=512,
        batch_size=32,
        small=(256, 6, 4, 688),
        large=(768, 12, 12, 2048),
        small_pretrain_steps=4000,
        large_pretrain_steps=4000,
        finetune_steps=2000,
        small_lr=2e-3,
        large_lr=6e-4,
        eval_blocks=512,
        num_points=41,
        exact_match_examples=256,
        speculative_prompts=64,
        prompt_len=128,
        new_tokens=128,
        draft_len=4,
        decoded_points=11,
    ),
}


def _model(dims, tokenizer, architecture: str, seed: int):
    hidden, layers, heads, intermediate = dims
    return build_model(
        "tiny",
        architecture,
        seed=seed,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
    )


def _common_args(out: str, steps: int, cfg: dict, learning_rate: float, seed: int) -> dict:
    return dict(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=cfg["batch_size"],
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.1,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def pretrain(model, train, collator, steps, cfg, learning_rate, seed, workdir) -> tuple[float, float]:
    args = TrainingArguments(**_common_args(workdir, steps, cfg, learning_rate, seed))
    start = time.perf_counter()
    result = Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()
    return float(result.training_loss), time.perf_counter() - start


def finetune(small_state, cfg, preset, large, train, collator, tokenizer, architecture, seed, workdir):
    small = _model(cfg["small"], tokenizer, architecture, seed)
    small.load_state_dict(small_state)
    args = CascadeAwareTrainingArguments(
        **_common_args(workdir, cfg["finetune_steps"], cfg, cfg["small_lr"] / 3, seed + 1),
        cascade_preset=preset,
        precompute_large_predictions=not LOSS_PRESETS[preset].needs_large_logits
        and LOSS_PRESETS[preset].needs_large_predictions,
    )
    trainer = CascadeAwareTrainer(
        model=small,
        args=args,
        large_model=large if not LOSS_PRESETS[preset].is_standard else None,
        train_dataset=train,
        data_collator=collator,
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    result = trainer.train()
    return trainer.model.eval(), float(result.training_loss), time.perf_counter() - start


def completion_pairs(cfg: dict, tokenizer):
    """Held-out docstring -> body pairs with short completions (greedy exact match needs every token right)."""
    if not cfg["exact_match_examples"]:
        return None
    # the validation files, like the token-accuracy blocks: held out from every model's training
    pairs = build_code_sft_dataset("python", scope=cfg["scope"], max_files=cfg["max_files"])["validation"]
    short = pairs.filter(lambda row: len(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) <= 64)
    return short.select(range(min(cfg["exact_match_examples"], len(short))))


def decode_strategies(cascade, eval_rows: torch.Tensor, cfg: dict) -> dict:
    """Decoded curves of every strategy on the first `speculative_prompts` held-out blocks (prompt, then reference)."""
    rows = eval_rows[: cfg["speculative_prompts"]]
    prompt_len, new = cfg["prompt_len"], cfg["new_tokens"]
    start = time.perf_counter()
    result = decoded_curves(
        cascade,
        rows[:, :prompt_len],
        rows[:, prompt_len : prompt_len + new],
        alphas=DEFAULT_ALPHAS,
        draft_len=cfg["draft_len"],
        num_points=cfg["decoded_points"],
    )
    result["seconds"] = time.perf_counter() - start
    return result


def summarize_decoded(decoded: dict) -> dict:
    """Per small model and method: area under quality vs small share, and the cheapest point at the large model -1%;
    then, per method, the CAT model's area gain over the standard one (does CAT help that strategy?)."""
    summary: dict = {}
    for preset, result in decoded.items():
        summary[preset] = {
            "small_quality": result["small"]["quality"],
            "large_quality": result["large"]["quality"],
            "speculative_decoding": {
                k: result["speculative_decoding"][k]
                for k in (
                    "quality",
                    "relative_flops",
                    "relative_wall",
                    "tokens_per_large_forward",
                    "equal_to_large_greedy",
                )
            },
            "methods": {
                name: {"area": curve["area"], **result["at_large_minus_1pct"][name]}
                for name, curve in result["curves"].items()
            },
        }
    if "standard" in summary:
        for preset in summary:
            if preset != "standard":
                summary[preset]["area_gain_vs_standard"] = {
                    name: method["area"] - summary["standard"]["methods"][name]["area"]
                    for name, method in summary[preset]["methods"].items()
                }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, SIZES, "cpu_small", "scripts/results/cascade_cpu_small")
    parser.add_argument("--architecture", default="llama", choices=("llama", "qwen2", "mistral"))
    parser.add_argument(
        "--presets", default=",".join(LOSS_PRESETS), help="comma-separated loss presets; 'standard' is the baseline"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        *option_names("finetune_steps"), type=int, default=None, help="override the size's fine-tuning steps"
    )
    parser.add_argument(
        *option_names("pretrain_steps"), type=int, default=None, help="override both models' pre-training steps"
    )
    parser.add_argument(
        *option_names("exact_match_examples"),
        type=int,
        default=None,
        help="docstring -> body pairs (validation split, completions <= 64 tokens) for sequence-level exact-match curves; 0 skips",
    )
    parser.add_argument(
        *option_names("speculative_prompts"),
        type=int,
        default=None,
        help="prompts of the decoded curves (override; 0 skips them)",
    )
    parser.add_argument(
        *option_names("speculative_presets"),
        default="standard,paper",
        help="small models (loss presets) whose cascades are decoded: speculative cascades vs the other strategies",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning()
    cfg = dict(SIZES[args.size])
    if args.finetune_steps is not None:
        cfg["finetune_steps"] = args.finetune_steps
    if args.pretrain_steps is not None:
        cfg["small_pretrain_steps"] = cfg["large_pretrain_steps"] = args.pretrain_steps
    if args.exact_match_examples is not None:
        cfg["exact_match_examples"] = args.exact_match_examples
    if args.speculative_prompts is not None:
        cfg["speculative_prompts"] = args.speculative_prompts
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in LOSS_PRESETS]
    if unknown or "standard" not in presets:
        parser.error(f"--presets must include 'standard' and only names of {sorted(LOSS_PRESETS)}; got {presets}")
    decoded_presets = (
        [p for p in args.speculative_presets.split(",") if p in presets] if cfg["speculative_prompts"] else []
    )
    wall = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stem = output_stem(args.output)
    stem.parent.mkdir(parents=True, exist_ok=True)

    corpus = load_corpus("python", scope=cfg["scope"], max_files=cfg["max_files"])
    tokenizer = train_tokenizer(corpus, vocab_size=cfg["vocab_size"])
    packed = pack_dataset(corpus, tokenizer, cfg["block_size"])
    train = packed["train"].shuffle(seed=args.seed)
    validation = packed["validation"].select(range(min(cfg["eval_blocks"], len(packed["validation"]))))
    eval_rows = torch.tensor(validation["input_ids"])
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    logger.info("train blocks %d, eval blocks %d", len(train), len(validation))
    pairs = completion_pairs(cfg, tokenizer)

    results: dict = {"pretrain": {}, "finetune": {}}
    with tempfile.TemporaryDirectory() as tmp:
        small = _model(cfg["small"], tokenizer, args.architecture, args.seed)
        large = _model(cfg["large"], tokenizer, args.architecture, args.seed + 100)
        for name, model in (("small", small), ("large", large)):
            steps = cfg[f"{name}_pretrain_steps"]
            loss, seconds = pretrain(
                model, train, collator, steps, cfg, cfg[f"{name}_lr"], args.seed, os.path.join(tmp, name)
            )
            results["pretrain"][name] = {
                "parameters": sum(p.numel() for p in model.parameters()),
                "steps": steps,
                "train_loss": loss,
                "seconds": seconds,
            }
            logger.info("pre-trained %s: loss %.3f in %.0fs", name, loss, seconds)
        large.eval()
        small_state = {k: v.detach().clone() for k, v in small.state_dict().items()}
        # the fine-tuning data: one epoch of the same blocks, in the same order, for every preset
        finetune_data = train.select(range(min(len(train), cfg["finetune_steps"] * cfg["batch_size"])))

        curves = {"token": {}, "sequence": {}, **({"exact_match": {}} if pairs is not None else {})}
        forward_cache: dict = {}  # the large model's teacher-forced pass is shared by every preset's curves
        decoded: dict = {}
        for preset in presets:
            tuned, loss, seconds = finetune(
                small_state,
                cfg,
                preset,
                large,
                finetune_data,
                collator,
                tokenizer,
                args.architecture,
                args.seed,
                os.path.join(tmp, preset),
            )
            cascade = CascadeForCausalLM.from_models(tuned.to(device), large.to(device), rule="chow_average")
            if pairs is not None:
                curves["exact_match"][preset] = deferral_curve(
                    cascade,
                    pairs,
                    metric="exact_match",
                    level="sequence",
                    tokenizer=tokenizer,
                    num_points=cfg["num_points"],
                    batch_size=16,
                )
            for level in ("token", "sequence"):
                curves[level][preset] = deferral_curve(
                    cascade,
                    eval_rows,
                    metric="token_accuracy",
                    level=level,
                    num_points=cfg["num_points"],
                    batch_size=32,
                    cache=forward_cache,
                )
            results["finetune"][preset] = {
                "weights": asdict(LOSS_PRESETS[preset]),
                "steps": cfg["finetune_steps"],
                "train_loss": loss,
                "seconds": seconds,
                "small_token_accuracy": curves["token"][preset].small_quality,
                "small_token_loss": deferral_curve(
                    cascade, eval_rows, metric="token_loss", level="token", num_points=2, cache=forward_cache
                ).small_quality,
            }
            logger.info("fine-tuned %s: train loss %.3f, area %.4f", preset, loss, curves["token"][preset].area)
            if preset in decoded_presets:
                decoded[preset] = decode_strategies(cascade, eval_rows, cfg)
                logger.info("decoded curves of %s in %.0fs", preset, decoded[preset]["seconds"])

    summary = {level: summarize_curves(c, baseline="standard") for level, c in curves.items()}
    best = max((p for p in presets if p != "standard"), key=lambda p: summary["token"][p]["area"], default="standard")
    png = with_suffix(stem, ".png")
    plot_deferral_curves(
        curves["token"], png, title=f"CAT vs standard fine-tuning, token-level deferral ({args.size}, {device})"
    )
    seq_png = with_suffix(stem, "_sequence.png")
    plot_deferral_curves(
        curves["sequence"], seq_png, title=f"CAT vs standard, sequence-level Chow-Average ({args.size}, {device})"
    )
    plots = [str(png), str(seq_png)]
    if pairs is not None:
        em_png = with_suffix(stem, "_exact_match.png")
        plot_deferral_curves(
            curves["exact_match"],
            em_png,
            title=f"CAT vs standard, docstring -> body exact match ({args.size}, {device})",
        )
        plots.append(str(em_png))
    record = run_record(device)
    report = {
        "benchmark": "cascade-aware training: deferral curves, CAT variants vs standard fine-tuning",
        **record,
        "git": {"commit": record["git_commit"], "dirty": record["git_dirty"]},  # the key of earlier results
        "size": args.size,
        "config": cfg,
        "metric": "next-token accuracy on held-out validation blocks (teacher forced)",
        "results": results,
        "summary": summary,
        "best_cat_preset_by_token_area": best,
        "best_gain_in_token_area_vs_standard": summary["token"].get(best, {}).get("area_gain_vs_standard"),
        "curves": {level: {p: c.to_dict() for p, c in cs.items()} for level, cs in curves.items()},
        "wall_seconds": time.perf_counter() - wall,
        "plots": plots,
        "exact_match_examples": 0 if pairs is None else len(pairs),
    }
    if decoded:
        decoded_png = with_suffix(stem, "_decoded.png")
        plot_decoded_curves(
            decoded, decoded_png, title=f"Decoded cascades vs speculative cascades ({args.size}, {device}, batch 1)"
        )
        plots.append(str(decoded_png))
        report["decoded"] = decoded
        report["decoded_summary"] = summarize_decoded(decoded)
        report["decoded_metric"] = (
            f"quality: mean log-prob under the large model of the {cfg['new_tokens']} greedy tokens decoded after a "
            f"{cfg['prompt_len']}-token held-out prompt (batch 1, EOS off); also continuation_accuracy (share equal to "
            "the held-out reference tokens) and agreement_with_large (share equal to the large model's greedy tokens)"
        )
    with_suffix(stem, ".json").write_text(json.dumps(report, indent=2))
    print(
        json.dumps(
            {
                "summary": summary,
                "best": best,
                "decoded": report.get("decoded_summary"),
                "wall_seconds": report["wall_seconds"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
