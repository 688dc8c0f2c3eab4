"""Benchmark of MSN fine-tuning + exact Jacobi / TR-Jacobi decoding against the stock alternatives.

One run, side by side:
1. pre-train a code model on the local Python source corpus (token-level, stock `Trainer`);
2. fine-tune it twice on the code SFT set (signature + docstring -> body), same steps and data order:
   plain SFT (`noise_length=0`) and MSN (`noise_length=L`), both with `NoisySFTTrainer`; record their clean
   validation losses; build a retrieval datastore from the pre-training corpus's TRAIN split;
3. on HumanEval prompts (`--humaneval`, the 164-prompt jsonl.gz) and held-out corpus prompts (the SFT test split:
   files never trained on), decode greedily with every method on both models:
   `greedy` (`generate`), `static_greedy` (`cache_implementation="static"`), `prompt_lookup`
   (`prompt_lookup_num_tokens=10`), and this package's `jacobi`, `tr_jacobi_msn` (the static 69-node tree),
   `tr_jacobi_no_memory` (the auto tree drafting from the prompt + generated text only), `tr_jacobi` (the default:
   `tree="auto"` plus the memory of earlier outputs) and `tr_jacobi_datastore` (the default + the datastore);
   the memory of earlier outputs holds greedy's outputs of the prompts measured BEFORE the current one (a
   `DraftMemory(learn=False)` filled by this script after each prompt, so that no method ever drafts from the
   current prompt's own output, whatever the order of methods or repeats);
   per prompt: new tokens, model forwards (counted by a forward hook, the same way for every method), wall-clock,
   whether the output equals greedy's token for token, the cost over its own forwards (wall-clock over the seconds
   spent inside the model's forwards of that very call, timed by forward hooks: what the decoding loop adds to plain
   forwards of exactly the tokens and masks it verified), and the step overhead ratio (seconds per decoding step,
   prefill subtracted, over ONE separate plain forward of the step's mean width with the same kind of mask on the
   median prompt: a coarser figure, since that one forward sees neither the cache lengths nor the load of each step).
   On greedy's output, the text-retrieval ceiling (`text_retrieval_ceiling`): the tokens per forward of a drafter
   that copies, with hindsight, the longest continuation of the current token from anywhere in prompt + generated
   text, the most that drafting from the text alone can give (the datastore and the model's own drafts add to it).
   By default every method generates exactly `max_new_tokens` (EOS off, so that all methods decode the same length);
   `--stop-at-eos` stops at EOS.
Writes JSON (device, date, command, versions, every number) and a PNG.

Training stages are cached in `--work-dir`; `--stage train` stops before timing (timings need a quiet machine):

    OMP_NUM_THREADS=1 python scripts/bench_decode.py --size cpu_mini --stage train --work-dir /tmp/decode
    OMP_NUM_THREADS=2 python scripts/bench_decode.py --size cpu_mini --work-dir /tmp/decode --humaneval ../shared/data/HumanEval.jsonl.gz
    python scripts/bench_decode.py --size gpu --bf16 --humaneval ../shared/data/HumanEval.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
import transformers
from bench_common import (
    add_common_arguments,
    git_state,
    no_activation_checkpointing,
    option_names,
    output_stem,
    run_record,
    with_suffix,
)
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from hf_effitrain.data import build_code_sft_dataset, load_corpus, pack_dataset, train_tokenizer
from hf_effitrain.data.datastore import build_datastore, load_datastore, save_datastore
from hf_effitrain.hub.draft_memory import DraftMemory
from hf_effitrain.hub.generation_effi import generate as effi_generate
from hf_effitrain.hub.transformers_compat import model_cache_kwarg
from hf_effitrain.methods.msn.config import NoisySFTConfig
from hf_effitrain.methods.msn.trainer import NoisySFTTrainer
from hf_effitrain.models.presets import build_model, parse_config_overrides

logger = logging.getLogger("bench_decode")

SIZES = {
    "cpu_small": dict(
        preset="tiny",
        config_overrides="hidden_size=64,intermediate_size=176,num_attention_heads=4,num_key_value_heads=4",
        scope="stdlib",
        max_files=None,
        vocab_size=1024,
        block_size=128,
        pretrain_steps=600,
        pretrain_batch=16,
        pretrain_lr=3e-3,
        sft_steps=200,
        sft_batch=8,
        sft_lr=1e-3,
        sft_max_length=192,
        humaneval_prompts=16,
        corpus_prompts=16,
        max_new_tokens=64,
        repeats=3,
        datastore_tokens=2_000_000,
    ),
    # the CPU benchmark size: the `mini` preset (5.3M params at vocab 4096) pre-trained ~15-20 min on 2 cores
    "cpu_mini": dict(
        preset="mini",
        config_overrides="",
        scope="site",
        max_files=3000,
        vocab_size=4096,
        block_size=256,
        pretrain_steps=800,
        pretrain_batch=16,
        pretrain_lr=2e-3,
        sft_steps=400,
        sft_batch=8,
        sft_lr=5e-4,
        sft_max_length=256,
        humaneval_prompts=164,
        corpus_prompts=100,
        max_new_tokens=64,
        repeats=1,
        datastore_tokens=8_000_000,
    ),
    "gpu": dict(
        # small preset with 8 layers: 33.7M parameters at vocab 8192 (the issue asks for >= 30M)
        preset="small",
        config_overrides="num_hidden_layers=8",
        scope="all",
        max_files=None,
        vocab_size=8192,
        block_size=512,
        pretrain_steps=6000,
        pretrain_batch=32,
        pretrain_lr=1e-3,
        sft_steps=1500,
        sft_batch=16,
        sft_lr=3e-4,
        sft_max_length=768,
        humaneval_prompts=164,
        corpus_prompts=100,
        max_new_tokens=128,
        repeats=2,
        datastore_tokens=50_000_000,
    ),
}
# tr_jacobi = the default (tree="auto" + the memory of earlier outputs); tr_jacobi_no_memory = the auto tree without
# that memory; tr_jacobi_msn = the paper's static 69-node tree
METHODS = (
    "greedy",
    "static_greedy",
    "prompt_lookup",
    "jacobi",
    "tr_jacobi_msn",
    "tr_jacobi_no_memory",
    "tr_jacobi",
    "tr_jacobi_datastore",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(
        parser,
        SIZES,
        "cpu_small",
        output_aliases=("--out",),
        output_help="path prefix of the JSON and PNG (default scripts/results/decode_<size>)",
    )
    parser.add_argument("--humaneval", default=None, help="Path of HumanEval.jsonl.gz (164 prompts); omit to skip.")
    parser.add_argument("--architecture", default="llama")
    parser.add_argument(*option_names("noise_length"), type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="Train and decode in bfloat16 (GPU).")
    parser.add_argument(
        *option_names("stop_at_eos"),
        action="store_true",
        help="Stop at EOS (default: every method generates exactly max_new_tokens, eos_token_id=None).",
    )
    parser.add_argument(
        *option_names("work_dir"),
        default=None,
        help="Folder for checkpoints (default: a temp folder); finished "
        "training stages found there are reused, so the timing stage can be rerun alone.",
    )
    parser.add_argument(
        *option_names("pretrain_minutes"),
        type=float,
        default=None,
        help="Stop pre-training after this many minutes (constant learning rate after warm-up; "
        "the steps actually taken are recorded). Default: exactly --pretrain-steps, cosine schedule.",
    )
    parser.add_argument(
        *option_names("time_budget_minutes"),
        type=float,
        default=None,
        help="Stop timing a model's prompts after this many minutes (the report says how many were measured).",
    )
    parser.add_argument(
        "--models",
        default="sft,msn",
        help="Which fine-tuned models to time (comma-separated from sft,msn): e.g. one per process.",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="Merge the JSON reports of single-model runs (same config) into --output (JSON + PNG) and exit.",
    )
    parser.add_argument(
        "--stage",
        choices=("all", "train"),
        default="all",
        help="`train`: pre-train and fine-tune into --work-dir, then stop (timing needs a quiet machine).",
    )
    for key, value in SIZES["cpu_small"].items():
        parser.add_argument(
            *option_names(key),
            type=type(value) if value is not None else int,
            default=None,
            help=f"override the size preset's value (cpu_small: {value})",
        )
    args = parser.parse_args(argv)
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.max_files = args.max_files or None  # 0 = every file
    args.output = args.output or f"scripts/results/decode_{args.size}"
    if args.noise_length < 1:
        parser.error(f"--noise-length must be >= 1 (the MSN run), got {args.noise_length}")
    return args


def _train_args(out: Path, args, **kw) -> dict:
    return dict(
        output_dir=str(out),
        report_to="none",
        save_strategy="no",
        logging_steps=25,
        bf16=args.bf16,
        dataloader_num_workers=0,
        seed=0,
        warmup_steps=max(1, kw.get("max_steps", 100) // 20),
        lr_scheduler_type="cosine",
        **kw,
    )


class TimeBudget(TrainerCallback):
    """Stops training once `seconds` of wall-clock have passed (the machine's load decides how many steps that is)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True


def _load_state(work: Path) -> dict:
    path = work / "train.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(work: Path, state: dict) -> None:
    (work / "train.json").write_text(json.dumps(state, indent=1))


def work_dir_tokenizer(args, corpus, work: Path):
    """The tokenizer saved with a cached pre-trained checkpoint, else one trained on the corpus.

    The corpus is this machine's installed Python source, so it changes when a package is installed, and so does a
    freshly trained tokenizer: models reused from `--work-dir` must be decoded with the one they were trained with.
    """
    saved = work / "pretrain"
    if (saved / "model.safetensors").exists() and (saved / "tokenizer.json").exists():
        logger.info("using the tokenizer saved with the pre-trained checkpoint in %s", saved)
        return transformers.AutoTokenizer.from_pretrained(saved)
    return train_tokenizer(corpus, vocab_size=args.vocab_size)


def pretrain(args, corpus, tokenizer, work: Path) -> Path:
    """A token-level code model pre-trained with the stock `Trainer` on packed corpus blocks (reused from `--work-dir`)."""
    out = work / "pretrain"
    state = _load_state(work)
    if (out / "model.safetensors").exists() and "pretrain_seconds" in state:
        logger.info("reusing the pre-trained checkpoint in %s", out)
        return out
    blocks = pack_dataset(corpus["train"], tokenizer, args.block_size)
    model = build_model(
        args.preset,
        args.architecture,
        vocab_size=len(tokenizer),
        max_position_embeddings=max(1024, args.sft_max_length + args.max_new_tokens),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=0,
        **parse_config_overrides(args.config_overrides),
    )
    targs = _train_args(
        out,
        args,
        max_steps=args.pretrain_steps,
        per_device_train_batch_size=args.pretrain_batch,
        learning_rate=args.pretrain_lr,
    )
    callbacks = []
    if args.pretrain_minutes:
        targs.update(lr_scheduler_type="constant_with_warmup", warmup_steps=20)
        callbacks.append(TimeBudget(args.pretrain_minutes * 60))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**targs),
        train_dataset=blocks,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    steps = trainer.state.global_step
    logger.info("pre-trained %d params for %d steps in %.0fs", model.num_parameters(), steps, seconds)
    trainer.save_model()
    tokenizer.save_pretrained(out)  # the work dir keeps the tokenizer its models were trained with
    state.update(
        pretrain_seconds=seconds,
        pretrain_steps=steps,
        pretrain_tokens=steps * args.pretrain_batch * args.block_size,
        pretrain_loss=[r["loss"] for r in trainer.state.log_history if "loss" in r][-1:],
    )
    _save_state(work, state)
    return out


def fine_tune(args, pretrained: Path, tokenizer, sft, noise_length: int, work: Path):
    """Plain SFT (noise_length=0) or MSN from the same checkpoint, same data order and steps; returns (model, eval loss).

    The model returned is reloaded from the saved checkpoint: the trained in-memory model keeps trl's fused-LM-head
    forward wrapper, which is not what a user decodes with.
    """
    out = work / f"sft_L{noise_length}"
    state = _load_state(work)
    key = f"sft_L{noise_length}_eval_loss"
    if (out / "model.safetensors").exists() and key in state:
        logger.info("reusing the fine-tuned checkpoint in %s", out)
        return transformers.AutoModelForCausalLM.from_pretrained(out).eval(), state[key]
    model = transformers.AutoModelForCausalLM.from_pretrained(pretrained)
    config = NoisySFTConfig(
        **_train_args(
            out,
            args,
            max_steps=args.sft_steps,
            per_device_train_batch_size=args.sft_batch,
            per_device_eval_batch_size=args.sft_batch,
            learning_rate=args.sft_lr,
            max_length=args.sft_max_length,
            **no_activation_checkpointing(),
            noise_length=noise_length,
            use_cpu=not torch.cuda.is_available(),
        )
    )
    held_out = datasets.concatenate_datasets([sft["validation"], sft["test"]])  # functions of files never trained on
    if len(held_out) == 0:
        raise ValueError(
            "The code SFT set has no held-out functions at this corpus size; raise --max-files (0 = all files)."
        )
    trainer = NoisySFTTrainer(
        model=model, args=config, train_dataset=sft["train"], eval_dataset=held_out, processing_class=tokenizer
    )
    start = time.perf_counter()
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    logger.info("SFT noise_length=%d: eval loss %.4f (%.0fs)", noise_length, loss, time.perf_counter() - start)
    trainer.save_model()  # decode from the saved checkpoint, as a user would (not trl's training-time forward wrapper)
    state = _load_state(work)
    state[key] = loss
    state[f"sft_L{noise_length}_seconds"] = time.perf_counter() - start
    _save_state(work, state)
    return transformers.AutoModelForCausalLM.from_pretrained(config.output_dir).eval(), loss


def load_prompts(args, sft) -> list[dict]:
    prompts = []
    if args.humaneval:
        with gzip.open(args.humaneval, "rt") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        # without the trailing newline, like the code SFT prompts: the BPE merges a newline with the indentation after
        # it, so a prompt ending in a bare newline ends in a token the model never saw there
        prompts += [
            {"source": "humaneval", "id": r["task_id"], "text": r["prompt"].rstrip("\n")}
            for r in rows[: args.humaneval_prompts]
        ]
    test = sft["test"]
    prompts += [
        {"source": "corpus", "id": f"{r['path']}::{r['name']}", "text": r["prompt"]}
        for r in test.select(range(min(args.corpus_prompts, len(test))))
    ]
    return prompts


class ForwardCounter:
    """Counts top-level forwards of a model and the seconds spent inside them (every method is measured the same way).

    The seconds give each method's cost beyond the model itself: a call's wall-clock over the time its own forwards
    took, i.e. over plain forwards of exactly the tokens and masks it verified, measured in the same run and under the
    same load (a separate reference forward cannot match the cache lengths and the load of every step). On a GPU each
    hook synchronises the device; every method already waits for its step's result once per step.
    """

    def __init__(self, model):
        self.count = 0
        self.seconds = 0.0
        self._start = None
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def reset(self) -> None:
        self.count, self.seconds = 0, 0.0

    def _before(self, *_):
        self.count += 1
        _sync()
        self._start = time.perf_counter()

    def _after(self, *_):
        _sync()
        self.seconds += time.perf_counter() - self._start


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode(
    model,
    ids,
    method: str,
    max_new_tokens: int,
    pad_id: int,
    stop_at_eos: bool = False,
    datastore=None,
    memory: DraftMemory | None = None,
):
    common = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    if not stop_at_eos:
        common["eos_token_id"] = None
    if method == "greedy":
        return model.generate(ids, **common)
    if method == "static_greedy":
        return model.generate(ids, cache_implementation="static", **common)
    if method == "prompt_lookup":
        return model.generate(ids, prompt_lookup_num_tokens=10, max_matching_ngram_size=3, **common)
    ours = dict(return_dict_in_generate=True, **common)
    if method == "jacobi":
        return effi_generate(model, ids, strategy="jacobi", **ours)
    if method == "tr_jacobi_msn":
        return effi_generate(model, ids, strategy="tr_jacobi", tree="msn", **ours)
    if method == "tr_jacobi_no_memory":
        return effi_generate(model, ids, strategy="tr_jacobi", draft_memory_tokens=0, **ours)
    # the default (tree="auto"), with the benchmark's memory in place of the model's own (which would also learn)
    if method == "tr_jacobi":
        return effi_generate(model, ids, strategy="tr_jacobi", draft_memory=memory, **ours)
    if method == "tr_jacobi_datastore":
        return effi_generate(model, ids, strategy="tr_jacobi", datastore=datastore, draft_memory=memory, **ours)
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def _interval(values: list[float]) -> list[float]:
    """Mean and its 95% interval over prompts (normal approximation)."""
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return [mean, mean - half, mean + half]


class ReferenceForward:
    """Seconds of ONE plain forward of `width` new tokens over a cache of `cache_len` positions, with the mask a
    decoding step of that width passes (a 4D tree-shaped mask; the model's own causal mask for width 1 and for chains).
    The step overhead ratio is a method's seconds per step over this."""

    def __init__(self, model, ids: torch.Tensor, repeats: int = 5):
        self.model, self.ids, self.repeats = model, ids, repeats
        self.cached: dict[tuple[int, bool], float] = {}

    @torch.inference_mode()
    def __call__(self, width: int, tree_mask: bool) -> float:
        key = (width, tree_mask and width > 1)
        if key in self.cached:
            return self.cached[key]
        model, ids = self.model, self.ids
        cache = transformers.DynamicCache(config=model.config)
        name = model_cache_kwarg(model)
        model(input_ids=ids, use_cache=True, **{name: cache})
        length = cache.get_seq_length()
        tokens = ids[:, :width] if width <= ids.shape[1] else ids[:, :1].expand(1, width)
        positions = torch.arange(length, length + width, device=ids.device)[None]
        mask = None
        if key[1]:
            dtype = model.dtype
            mask = torch.zeros(width, length + width, dtype=dtype, device=ids.device)
            mask[:, length:] = torch.full((width, width), torch.finfo(dtype).min, dtype=dtype, device=ids.device).triu(
                1
            )
            mask = mask[None, None]
        best = float("inf")
        for _ in range(self.repeats):
            _sync()
            start = time.perf_counter()
            model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True, **{name: cache})
            _sync()
            best = min(best, time.perf_counter() - start)
            cache.crop(-width)
        self.cached[key] = best
        return best


def text_retrieval_ceiling(tokens: list[int], start: int, max_draft: int = 10) -> int:
    """Forwards that greedy decoding of `tokens[start:]` would need with a hindsight drafter of the text itself.

    At each step the drafter sees the text so far (prompt + generated, ending in the current token) and proposes, with
    hindsight, the longest continuation (at most `max_draft` tokens) copied from any earlier position that holds the
    current token; the step yields those drafts plus the bonus token. Every retrieval drafter that follows a match of
    at least one token in the text (the suffix structure, prompt lookup) accepts at most this much along one path, so
    its tokens per forward are the ceiling of drafting from the text alone. The prefill counts as the first forward
    (it yields `tokens[start]`), as in the methods' counts.
    """
    end = len(tokens) - 1
    seen: dict[int, list[int]] = {}
    for j in range(start):
        seen.setdefault(tokens[j], []).append(j)
    position, forwards = start, 1
    while position < end:
        room = min(max_draft, end - position - 1)  # the last new token comes as the bonus
        best = 0
        for j in seen.get(tokens[position], ()):
            k = 0
            while k < room and j + 1 + k <= position and tokens[j + 1 + k] == tokens[position + 1 + k]:
                k += 1
            best = max(best, k)
        for j in range(position, position + best + 1):  # now known: the root and the accepted drafts
            seen.setdefault(tokens[j], []).append(j)
        position += best + 1
        forwards += 1
    return forwards


def measure(model, tokenizer, prompts, args, datastore=None) -> dict:
    """Per method: per-prompt tokens, forwards, seconds, agreement with greedy; plus the totals.

    Methods are interleaved prompt by prompt (greedy first), so that a change in machine load hits all of them alike,
    and each (prompt, method) time is the minimum of `--repeats` runs.
    """
    methods = [m for m in METHODS if m != "tr_jacobi_datastore" or datastore is not None]
    # greedy's outputs of the prompts already measured: what a server's memory would hold when this prompt arrives
    memory = DraftMemory(learn=False)
    counter = ForwardCounter(model)
    encoded = [tokenizer(p["text"], return_tensors="pt")["input_ids"].to(model.device) for p in prompts]
    rows = {method: [] for method in methods}
    # warm-up on the longest prompt at full length: the allocator, static-cache greedy's cache (sized to the longest
    # call so far), the auto-compiled forward on CUDA, and the auto tree's one-off forward-cost measurement
    longest = max(encoded, key=lambda ids: ids.shape[1])
    for method in methods:
        decode(model, longest, method, args.max_new_tokens, tokenizer.pad_token_id, args.stop_at_eos, datastore, memory)
    median = sorted(encoded, key=lambda ids: ids.shape[1])[len(encoded) // 2]
    reference = ReferenceForward(model, median)
    started = time.perf_counter()
    for i, ids in enumerate(encoded):
        if args.time_budget_minutes and time.perf_counter() - started > 60 * args.time_budget_minutes:
            logger.warning("time budget reached: %d of %d prompts measured", i, len(encoded))
            break
        if i % 20 == 0:
            logger.info("prompt %d / %d (%.0fs)", i, len(encoded), time.perf_counter() - started)
        with torch.inference_mode():  # the prefill alone: subtracted to get the seconds of the decoding steps
            prefill = min(_timed(lambda: model(input_ids=ids)) for _ in range(max(2, args.repeats)))
        expected = None
        for method in methods:
            timings = []
            for _ in range(args.repeats):  # the minimum over repeats: robust to bursts of load from other jobs
                counter.reset()
                _sync()
                start = time.perf_counter()
                with torch.inference_mode():
                    out = decode(
                        model,
                        ids,
                        method,
                        args.max_new_tokens,
                        tokenizer.pad_token_id,
                        args.stop_at_eos,
                        datastore,
                        memory,
                    )
                _sync()
                timings.append((time.perf_counter() - start, counter.seconds))
            seconds, forward_seconds = min(timings)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            new = sequences[0, ids.shape[1] :]
            expected = new if expected is None else expected  # METHODS[0] is greedy
            steps = max(1, counter.count - 1)
            sizes = getattr(out, "tree_sizes", None)
            width = statistics.fmean(sizes) if sizes else (1.0 if method in ("greedy", "static_greedy") else None)
            row = {
                "prompt": prompts[i]["id"],
                "source": prompts[i]["source"],
                "prompt_tokens": int(ids.shape[1]),
                "new_tokens": int(new.numel()),
                "forwards": counter.count,
                "seconds": seconds,
                "prefill_seconds": prefill,
                "agrees_with_greedy": bool(torch.equal(new, expected)),
                "mean_tree_size": width,
                "forward_seconds": forward_seconds,
                "cost_over_own_forwards": seconds / forward_seconds,
            }
            if method == "greedy":  # what the text alone could give: the ceiling of retrieval drafts (hindsight)
                output = sequences[0].tolist()
                row["text_retrieval_ceiling_forwards"] = text_retrieval_ceiling(output, int(ids.shape[1]))
            if width is not None:  # seconds per decoding step over one plain forward of that width, same mask
                plain = reference(max(1, round(width)), tree_mask=method.startswith("tr_jacobi"))
                row["step_ms"] = 1e3 * max(seconds - prefill, 0.0) / steps
                row["step_overhead_ratio"] = row["step_ms"] / (1e3 * plain)
            rows[method].append(row)
        memory.add(expected.tolist())  # only now: no method drafted from this prompt's own output
    results = {}
    greedy_rate = sum(r["new_tokens"] for r in rows["greedy"]) / sum(r["seconds"] for r in rows["greedy"])
    for method in methods:
        mine = rows[method]
        tokens, seconds = sum(r["new_tokens"] for r in mine), sum(r["seconds"] for r in mine)
        result = {
            "prompts_measured": len(mine),
            "tokens_per_second": tokens / seconds,
            "speedup_vs_greedy": tokens / seconds / greedy_rate,
            "tokens_per_forward": tokens / max(1, sum(r["forwards"] for r in mine)),
            "tokens_per_forward_95": _interval([r["new_tokens"] / r["forwards"] for r in mine]),
            "agreement": sum(r["agrees_with_greedy"] for r in mine) / len(mine),
            "total_seconds": seconds,
            # wall-clock over the model's own forwards in the same calls (prefill included in both)
            "cost_over_own_forwards": seconds / sum(r["forward_seconds"] for r in mine),
        }
        if method == "greedy":
            ceiling = [r["text_retrieval_ceiling_forwards"] for r in mine]
            result["text_retrieval_ceiling_tokens_per_forward"] = tokens / sum(ceiling)
            result["text_retrieval_ceiling_95"] = _interval([r["new_tokens"] / f for r, f in zip(mine, ceiling)])
        if all("step_ms" in r for r in mine):
            result["step_ms"] = statistics.fmean(r["step_ms"] for r in mine)
            result["step_overhead_ratio"] = statistics.median(r["step_overhead_ratio"] for r in mine)
            result["mean_tree_size"] = statistics.fmean(r["mean_tree_size"] for r in mine)
        for source in sorted({r["source"] for r in mine}):
            part = [r for r in mine if r["source"] == source]
            base = [r for r in rows["greedy"] if r["source"] == source]
            result[f"speedup_vs_greedy_{source}"] = (
                sum(r["new_tokens"] for r in part) / sum(r["seconds"] for r in part)
            ) / (sum(r["new_tokens"] for r in base) / sum(r["seconds"] for r in base))
        if method in ("tr_jacobi", "tr_jacobi_datastore"):
            result["draft_memory_tokens_at_end"] = len(memory)  # greedy's outputs of all measured prompts
        result["per_prompt"] = mine
        results[method] = result
        logger.info(
            "%-20s %.1f tok/s (%.2fx greedy), %.2f tokens/forward, step overhead %s, %.2fx its own forwards, "
            "agreement %.2f",
            method,
            result["tokens_per_second"],
            result["speedup_vs_greedy"],
            result["tokens_per_forward"],
            f"{result['step_overhead_ratio']:.2f}x" if "step_overhead_ratio" in result else "-",
            result["cost_over_own_forwards"],
            result["agreement"],
        )
    return results


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    models = list(report["decoding"])
    methods = [m for m in METHODS if all(m in report["decoding"][name] for name in models)]
    width = 0.8 / len(models)
    for m, name in enumerate(models):
        res = report["decoding"][name]
        xs = [i + m * width for i in range(len(methods))]
        axes[0].bar(xs, [res[k]["speedup_vs_greedy"] for k in methods], width, label=name)
        tpf = [res[k]["tokens_per_forward_95"] for k in methods]
        axes[1].bar(
            xs,
            [t[0] for t in tpf],
            width,
            yerr=[[t[0] - t[1] for t in tpf], [t[2] - t[0] for t in tpf]],
            capsize=2,
            label=name,
        )
        ceiling = res["greedy"].get("text_retrieval_ceiling_95")
        if ceiling:  # recorded from this version on
            axes[1].axhline(ceiling[0], color=f"C{m}", ls="--", lw=0.9, label=f"{name}: text-retrieval ceiling")
        axes[2].bar(xs, [res[k].get("cost_over_own_forwards", 0.0) for k in methods], width, label=name)
    titles = (
        "wall-clock speedup over greedy generate",
        "new tokens per forward (95% interval)",
        "wall-clock / time inside its own model forwards",
    )
    for ax, title in zip(axes, titles):
        ax.set_xticks(
            [i + width * (len(models) - 1) / 2 for i in range(len(methods))],
            methods,
            rotation=35,
            ha="right",
            fontsize=8,
        )
        ax.set_title(title, fontsize=10)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.legend(fontsize=8)
    loss = report["validation_loss"]
    losses = " vs ".join(f"{name.upper()} {loss[name]:.3f}" for name in ("sft", "msn") if name in loss)
    fig.suptitle(f"{report['device']} | {report['date'][:10]} | val loss {losses} | {report['config']['size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def prepare_datastore(args, corpus, tokenizer, work: Path):
    """The retrieval datastore of the pre-training corpus's TRAIN split (held-out prompts cannot retrieve themselves),
    saved under `--work-dir` and reloaded from disk as a user would."""
    if not args.datastore_tokens:
        return None
    path = work / "datastore"
    if not (path / "datastore.json").exists():
        start = time.perf_counter()
        save_datastore(build_datastore(corpus, tokenizer, split="train", max_tokens=args.datastore_tokens), path)
        logger.info("datastore built in %.0fs", time.perf_counter() - start)
    return load_datastore(path, tokenizer=tokenizer)


def merge(paths: list[str], out: Path) -> dict:
    """One report from single-model reports of the same configuration (e.g. `--models sft` and `--models msn` run
    side by side, one process each)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    report = reports[0]
    for key, value in git_state().items():  # reports written before the commit was recorded
        report.setdefault(key, value)
    for other in reports[1:]:
        report["decoding"].update(other["decoding"])
        report["validation_loss"].update(other["validation_loss"])
        report.setdefault("merged_from", []).append(other["command"])
    loss = report["validation_loss"]
    if "sft" in loss and "msn" in loss:
        loss["msn_over_sft"] = loss["msn"] / loss["sft"]
    write_report(report, out)
    return report


def write_report(report: dict, out: Path) -> None:
    stem = output_stem(out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with_suffix(stem, ".json").write_text(json.dumps(report, indent=1))
    plot(report, with_suffix(stem, ".png"))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.merge:
        merge(args.merge, Path(args.output))
        return 0
    transformers.logging.set_verbosity_warning()
    torch.manual_seed(0)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_decode_"))
    corpus = load_corpus("python", scope=args.scope, max_files=args.max_files)
    tokenizer = work_dir_tokenizer(args, corpus, work)
    sft = build_code_sft_dataset("python", scope=args.scope, max_files=args.max_files)
    pretrained = pretrain(args, corpus, tokenizer, work)
    if args.stage == "train":
        for noise_length in (0, args.noise_length):
            fine_tune(args, pretrained, tokenizer, sft, noise_length, work)
        prepare_datastore(args, corpus, tokenizer, work)
        print(json.dumps(_load_state(work), indent=1))
        return 0
    datastore = prepare_datastore(args, corpus, tokenizer, work)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    prompts = load_prompts(args, sft)
    report = {
        **run_record(device),
        "config": vars(args),
        "dtype": str(dtype),
        "num_prompts": {
            "humaneval": sum(p["source"] == "humaneval" for p in prompts),
            "corpus": sum(p["source"] == "corpus" for p in prompts),
        },
        "training": _load_state(work),
        "validation_loss": {},
        "decoding": {},
        "datastore": None if datastore is None else {"tokens": len(datastore), **datastore.metadata},
        "note": "CPU timings are noisy: the cores are shared with other jobs." if device == "cpu" else "",
    }
    out = Path(args.output)
    wanted = args.models.split(",")
    for name, noise_length in (("sft", 0), ("msn", args.noise_length)):
        model, loss = fine_tune(args, pretrained, tokenizer, sft, noise_length, work)
        report["validation_loss"][name] = loss
        if name not in wanted:
            continue
        report["parameters"] = model.num_parameters()
        report["decoding"][name] = measure(model.to(device=device, dtype=dtype), tokenizer, prompts, args, datastore)
        write_report(report, out)  # after each model: a partial report survives an interrupted run
    report["validation_loss"]["msn_over_sft"] = report["validation_loss"]["msn"] / report["validation_loss"]["sft"]
    write_report(report, out)
    keys = (
        "speedup_vs_greedy",
        "tokens_per_forward",
        "step_overhead_ratio",
        "cost_over_own_forwards",
        "mean_tree_size",
        "agreement",
    )
    summary = {
        name: {m: {k: round(v[k], 3) for k in keys if k in v} for m, v in res.items()}
        for name, res in report["decoding"].items()
    }
    print(json.dumps({"validation_loss": report["validation_loss"], "decoding": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
