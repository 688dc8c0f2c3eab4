"""Which MSN noise schedule raises the drafts' acceptance: plain SFT and MSN variants fine-tuned from ONE checkpoint.

One run, side by side: from the same pre-trained checkpoint, with the same code SFT data, order and steps, fine-tune
plain SFT (`noise_length=0`) and MSN with each schedule of `--schedules` (segment length, share of samples, `ahead`
vs `uniform` noise); then, on the same held-out prompts (HumanEval with `--humaneval`, plus functions of corpus files
never trained on), decode greedily with `jacobi` and `tr_jacobi` (the default `tree="auto"` and the paper's static
`tree="msn"`) and count the model's forwards. Tokens per forward of `jacobi` and of the static tree do not depend on
the machine's load, so this benchmark needs no quiet machine for them; the auto tree is sized from a forward-cost
curve measured when each model's decoding starts, so its figure does depend on the load at that moment. Every output
is checked against plain greedy `generate` token for token. Reports, per model: held-out loss, and tokens per forward
with a 95% interval over prompts (per strategy). Writes JSON + PNG; fine-tuned checkpoints and their decoding
results are reused from `--work-dir` (same prompts and length).

    python scripts/bench_msn_noise.py --pretrained /tmp/decode/pretrain --humaneval ../shared/data/HumanEval.jsonl.gz
    python scripts/bench_msn_noise.py --size micro --output /tmp/msn_noise      # the CI check: trains its own model

`--pretrained` is a checkpoint folder with its tokenizer (e.g. the `pretrain` stage of `bench_decode.py --work-dir`);
without it the script pre-trains a model of the size's preset first (`pretrain_steps` blocks of the size's length and
batch, cached in `--work-dir`). On a CUDA GPU training runs under bf16 autocast (float32 weights) and decoding in
float32, so that exactness against greedy stays token for token.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts, also when loaded as a module

from bench_common import (  # noqa: E402
    add_common_arguments,
    no_activation_checkpointing,
    option_names,
    output_stem,
    run_record,
    source_digest,
    with_suffix,
)
from bench_decode import ForwardCounter, _interval, decode, load_prompts  # noqa: E402

from hf_effitrain.data import build_code_sft_dataset, load_corpus, load_tokenizer, pack_dataset, train_tokenizer  # noqa: E402
from hf_effitrain.methods.msn import NoisySFTConfig, NoisySFTTrainer  # noqa: E402
from hf_effitrain.models.presets import build_model  # noqa: E402

logger = logging.getLogger("bench_msn_noise")

STRATEGIES = ("jacobi", "tr_jacobi", "tr_jacobi_msn")
LABELS = {
    "jacobi": "jacobi",
    "tr_jacobi": "tr_jacobi auto (cost measured under load)",
    "tr_jacobi_msn": 'tr_jacobi tree="msn"',
}
SIZES = {
    # a CI check of the whole path: its own tiny model, a few steps, two schedules
    "micro": dict(
        preset="tiny",
        scope="stdlib",
        max_files=300,
        vocab_size=512,
        pretrain_steps=20,
        pretrain_block_size=128,
        pretrain_batch=8,
        sft_steps=6,
        sft_batch=4,
        sft_lr=1e-3,
        sft_max_length=96,
        humaneval_prompts=2,
        corpus_prompts=2,
        max_new_tokens=12,
        schedules="L0,L5",
    ),
    # the CPU size: the decode benchmark's `mini` model, 400 fine-tuning steps per schedule
    "cpu_mini": dict(
        preset="mini",
        scope="site",
        max_files=3000,
        vocab_size=4096,
        pretrain_steps=800,
        pretrain_block_size=256,
        pretrain_batch=16,
        sft_steps=400,
        sft_batch=8,
        sft_lr=5e-4,
        sft_max_length=256,
        humaneval_prompts=40,
        corpus_prompts=40,
        max_new_tokens=64,
        schedules="L0,L5,L3,L8,L5-uniform,L5-half",
    ),
    "gpu": dict(
        preset="small",
        scope="all",
        max_files=None,
        vocab_size=8192,
        pretrain_steps=6000,
        pretrain_block_size=512,
        pretrain_batch=16,
        sft_steps=1500,
        sft_batch=16,
        sft_lr=3e-4,
        sft_max_length=768,
        humaneval_prompts=164,
        corpus_prompts=100,
        max_new_tokens=128,
        schedules="L0,L5,L3,L8,L12,L5-uniform,L5-half",
    ),
}


@dataclass(frozen=True)
class Schedule:
    """One MSN noise schedule, named as on the command line: `L<length>[-uniform][-half]` (`L0` = plain SFT)."""

    name: str
    noise_length: int
    noise_kind: str = "ahead"
    noise_fraction: float = 1.0

    @classmethod
    def parse(cls, name: str) -> Schedule:
        head, *flags = name.split("-")
        if not head.startswith("L") or not head[1:].isdigit() or set(flags) - {"uniform", "half"}:
            raise ValueError(
                f"bad schedule {name!r}: expected L<length> with optional -uniform / -half, e.g. L5-uniform"
            )
        return cls(name, int(head[1:]), "uniform" if "uniform" in flags else "ahead", 0.5 if "half" in flags else 1.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(
        parser,
        SIZES,
        "cpu_mini",
        output_help="path prefix of the JSON and PNG (default scripts/results/msn_noise_<size>)",
    )
    parser.add_argument("--pretrained", default=None, help="Pre-trained checkpoint folder with its tokenizer.")
    parser.add_argument(
        "--humaneval", default=None, help="Path of HumanEval.jsonl.gz; omit to use corpus prompts only."
    )
    parser.add_argument(
        *option_names("work_dir"), default=None, help="Folder for the fine-tuned checkpoints (reused when present)."
    )
    parser.add_argument(
        "--schedules", default=None, help="Comma-separated schedules, e.g. L0,L5,L8,L5-uniform,L5-half."
    )
    for key in ("max_files", "pretrain_steps", "sft_steps", "humaneval_prompts", "corpus_prompts", "max_new_tokens"):
        parser.add_argument(*option_names(key), type=int, default=None, help="override the size's value")
    args = parser.parse_args(argv)
    for key, value in SIZES[args.size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.output = args.output or f"scripts/results/msn_noise_{args.size}"
    try:
        args.schedule_list = [Schedule.parse(name) for name in args.schedules.split(",")]
    except ValueError as error:
        parser.error(str(error))
    args.stop_at_eos = False
    return args


def pretrained_checkpoint(args, work: Path) -> Path:
    """`--pretrained`, or a model of the size's preset pre-trained here (token-level, stock `Trainer`)."""
    if args.pretrained:
        return Path(args.pretrained)
    out = work / "pretrain"
    if (out / "model.safetensors").is_file():
        return out
    corpus = load_corpus("python", scope=args.scope, max_files=args.max_files)
    tokenizer = train_tokenizer(corpus, vocab_size=args.vocab_size)
    blocks = pack_dataset(corpus["train"], tokenizer, args.pretrain_block_size)
    model = build_model(
        args.preset,
        "llama",
        vocab_size=len(tokenizer),
        max_position_embeddings=max(1024, args.pretrain_block_size, args.sft_max_length + args.max_new_tokens),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=0,
    )
    training = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=args.pretrain_steps,
        per_device_train_batch_size=args.pretrain_batch,
        learning_rate=3e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        seed=0,
        disable_tqdm=True,
    )
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=blocks, data_collator=collator)
    trainer.train()
    trainer.save_model()
    tokenizer.save_pretrained(out)
    return out


def fine_tune(args, pretrained: Path, tokenizer, sft, schedule: Schedule, work: Path) -> tuple[Path, float, float]:
    """Fine-tune `pretrained` with `schedule` (same data order and steps for every schedule); returns the saved
    checkpoint, its held-out loss and the seconds it took (reused when the checkpoint exists)."""
    out = work / f"sft_{schedule.name}"
    record = out / "msn_noise_run.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        return out, saved["eval_loss"], saved["seconds"]
    model = transformers.AutoModelForCausalLM.from_pretrained(pretrained)
    config = NoisySFTConfig(
        output_dir=str(out),
        max_steps=args.sft_steps,
        per_device_train_batch_size=args.sft_batch,
        per_device_eval_batch_size=args.sft_batch,
        learning_rate=args.sft_lr,
        max_length=args.sft_max_length,
        noise_length=schedule.noise_length,
        noise_kind=schedule.noise_kind,
        noise_fraction=schedule.noise_fraction,
        report_to="none",
        save_strategy="no",
        logging_steps=50,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        **no_activation_checkpointing(),
        disable_tqdm=True,
    )
    held_out = datasets.concatenate_datasets([sft["validation"], sft["test"]])  # functions of files never trained on
    if len(held_out) == 0:
        raise ValueError("The code SFT set has no held-out functions at this corpus size; raise --max-files.")
    trainer = NoisySFTTrainer(
        model=model, args=config, train_dataset=sft["train"], eval_dataset=held_out, processing_class=tokenizer
    )
    start = time.perf_counter()
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    seconds = time.perf_counter() - start
    trainer.save_model()
    record.write_text(json.dumps({"eval_loss": loss, "seconds": seconds}))
    logger.info("%s: held-out loss %.4f (%.0f s)", schedule.name, loss, seconds)
    return out, loss, seconds


@torch.inference_mode()
def acceptance(model, tokenizer, prompts, args) -> dict:
    """Per strategy: tokens per forward with its 95% interval over prompts, and prompts equal to greedy."""
    counter = ForwardCounter(model)
    pad = tokenizer.pad_token_id
    # the auto tree measures the model's forward cost once per model (extra forwards): not counted against a prompt
    warm = tokenizer(prompts[0]["text"], return_tensors="pt")["input_ids"].to(model.device)
    for name in STRATEGIES:
        decode(model, warm, name, args.max_new_tokens, pad)
    result = {name: {"tokens_per_forward": [], "equal_to_greedy": 0, "different": []} for name in STRATEGIES}
    for prompt in prompts:
        ids = tokenizer(prompt["text"], return_tensors="pt")["input_ids"].to(model.device)
        greedy = decode(model, ids, "greedy", args.max_new_tokens, pad)
        for name in STRATEGIES:
            counter.count = 0
            out = decode(model, ids, name, args.max_new_tokens, pad).sequences
            new = out.shape[1] - ids.shape[1]
            result[name]["tokens_per_forward"].append(new / max(counter.count, 1))
            equal = torch.equal(out, greedy)
            result[name]["equal_to_greedy"] += int(equal)
            if not equal:
                result[name]["different"].append(prompt["id"])
    return {
        name: {
            "tokens_per_forward": _interval(row["tokens_per_forward"]),
            "equal_to_greedy": row["equal_to_greedy"],
            "prompts": len(prompts),
            "different_from_greedy": row["different"],
        }
        for name, row in result.items()
    }


def load_for_decoding(checkpoint: Path):
    """The fine-tuned model as a user decodes it: reloaded from disk, float32 (exactness is token for token), on the
    GPU when there is one."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def _cached_acceptance(checkpoint: Path, tokenizer, prompts, args) -> dict:
    """`acceptance` of the checkpoint, reused from an earlier run on the same prompts and length by the same code."""
    cache = checkpoint / "msn_noise_decoding.json"
    # a change to the package or the scripts (the source digest) invalidates the saved results
    key = {"prompts": [p["id"] for p in prompts], "max_new_tokens": args.max_new_tokens, "source": source_digest()}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return saved["decoding"]
    decoding = acceptance(load_for_decoding(checkpoint), tokenizer, prompts, args)
    cache.write_text(json.dumps({"key": key, "decoding": decoding}))
    return decoding


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    width = 0.8 / len(STRATEGIES)
    for k, strategy in enumerate(STRATEGIES):
        means = [report["models"][n]["decoding"][strategy]["tokens_per_forward"] for n in names]
        xs = [i + (k - (len(STRATEGIES) - 1) / 2) * width for i in range(len(names))]
        ax.bar(
            xs,
            [m[0] for m in means],
            width,
            yerr=[[m[0] - m[1] for m in means], [m[2] - m[0] for m in means]],
            capsize=2,
            label=LABELS[strategy],
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("new tokens per forward (95% interval)")
    ax.set_title(f"MSN noise schedules vs plain SFT (L0), {report['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    stem = output_stem(args.output)
    stem.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or stem.parent / f"{stem.name}_work")
    work.mkdir(parents=True, exist_ok=True)
    pretrained = pretrained_checkpoint(args, work)
    tokenizer = load_tokenizer(str(pretrained))
    sft = build_code_sft_dataset("python", scope=args.scope, max_files=args.max_files)
    prompts = load_prompts(args, sft)
    report = {
        **run_record("cuda" if torch.cuda.is_available() else "cpu"),
        "size": args.size,
        "pretrained": str(pretrained),
        "sft_steps": args.sft_steps,
        "max_new_tokens": args.max_new_tokens,
        "num_prompts": len(prompts),
        "models": {},
    }
    for schedule in args.schedule_list:
        checkpoint, loss, seconds = fine_tune(args, pretrained, tokenizer, sft, schedule, work)
        report["models"][schedule.name] = {
            "noise_length": schedule.noise_length,
            "noise_kind": schedule.noise_kind,
            "noise_fraction": schedule.noise_fraction,
            "eval_loss": loss,
            "train_seconds": seconds,
            "decoding": _cached_acceptance(checkpoint, tokenizer, prompts, args),
        }
        logger.info(
            "%s: %s",
            schedule.name,
            {k: round(v["tokens_per_forward"][0], 3) for k, v in report["models"][schedule.name]["decoding"].items()},
        )
    with_suffix(stem, ".json").write_text(json.dumps(report, indent=2))
    plot(report, with_suffix(stem, ".png"))
    print(
        json.dumps(
            {
                name: {
                    "eval_loss": round(m["eval_loss"], 4),
                    **{k: [round(x, 3) for x in v["tokens_per_forward"]] for k, v in m["decoding"].items()},
                }
                for name, m in report["models"].items()
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
