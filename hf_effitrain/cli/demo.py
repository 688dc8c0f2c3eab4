"""`effitrain demo`: the package's main job, end to end on this machine's own Python source code.

Trains a tokenizer and a small model for a few minutes (GPU when present, else CPU), exports it Hub-ready,
reloads it through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, completes a code prompt with
plain greedy decoding and with TR-Jacobi decoding, and prints a short summary.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_effitrain.methods.patch.config import PatchTrainingArguments
from hf_effitrain.methods.patch.job import PretrainArguments, run_pretrain
from hf_effitrain.training.callbacks import TimeBudgetCallback
from hf_effitrain.training.resume import last_complete_checkpoint

from .generate import complete, load_checkpoint

logger = logging.getLogger(__name__)

# No trailing newline: the byte-level BPE merges a newline with the indentation after it ("\n   " + " return"), so a
# prompt ending in a bare "\n" asks the model to continue after a token it rarely saw inside a function body.
DEMO_PROMPT = 'def read_lines(path):\n    """Return the lines of the text file at `path`."""'


@dataclass
class DemoArguments:
    """Options of `effitrain demo`; the defaults are the main job (about 6 minutes on 2 CPU cores)."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Where checkpoints and the export go."})
    preset: str = field(default="mini", metadata={"help": "Model size preset (mini is about 5M parameters)."})
    architecture: str = field(default="llama", metadata={"help": "llama, qwen2, mistral, gpt2 or ode_shared."})
    scope: str = field(default="stdlib", metadata={"help": "Python source corpus scope: stdlib, site or all."})
    max_files: int | None = field(default=600, metadata={"help": "Corpus files used (deterministic subset)."})
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per optimizer step."})
    max_steps: int = field(default=800, metadata={"help": "Optimizer steps (the LR schedule spans them)."})
    time_budget_s: float = field(default=330.0, metadata={"help": "Stop training after this many seconds."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate."})
    patch_size: int = field(default=4, metadata={"help": "K of patch-level pre-training (1: token-level only)."})
    patch_fraction: float = field(
        default=2 / 3,
        metadata={"help": "lambda: share of the training tokens consumed at patch level (0: token-level only)."},
    )
    max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated for the sample completion."})
    prompt: str = field(default=DEMO_PROMPT, metadata={"help": "Code prompt to complete."})
    resume: bool = field(
        default=True,
        metadata={
            "help": "Continue from the newest checkpoint under output_dir when there is one (an interrupted demo "
            "picks up where it stopped); --resume false starts over."
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be > 0, got {self.time_budget_s}.")
        if not self.prompt:
            raise ValueError("prompt is empty; give a code prompt to complete.")


def demo_checkpoint_to_resume(demo: DemoArguments) -> str | None:
    """The newest checkpoint of an earlier (maybe interrupted) demo in `output_dir`, if `resume` and there is one."""
    return last_complete_checkpoint(Path(demo.output_dir) / "checkpoints") if demo.resume else None


def demo_training_arguments(demo: DemoArguments, resume_from: str | None = None) -> TrainingArguments:
    """`PatchTrainingArguments` for the demo (patch-level, then token-level training), resuming from `resume_from`."""
    return PatchTrainingArguments(
        patch_size=demo.patch_size,
        patch_fraction=demo.patch_fraction,
        output_dir=str(Path(demo.output_dir) / "checkpoints"),
        resume_from_checkpoint=resume_from,
        max_steps=demo.max_steps,
        per_device_train_batch_size=demo.batch_size,
        per_device_eval_batch_size=demo.batch_size,
        learning_rate=demo.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, demo.max_steps // 20),
        weight_decay=0.1,
        logging_steps=max(1, demo.max_steps // 10),
        save_steps=max(1, demo.max_steps // 3),
        save_total_limit=1,
        eval_strategy="no",
        report_to="none",
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        seed=0,
    )


def run_demo(demo: DemoArguments) -> dict:
    """Train, export, reload with remote code, complete a prompt two ways; returns the summary it prints."""
    export_dir = Path(demo.output_dir) / "export"
    pretrain_args = PretrainArguments(
        preset=demo.preset,
        architecture=demo.architecture,
        scope=demo.scope,
        max_files=demo.max_files,
        vocab_size=demo.vocab_size,
        block_size=demo.block_size,
        max_eval_blocks=64,
        export_dir=str(export_dir),
        overwrite_export=True,  # the demo owns its output folder
    )
    started = time.perf_counter()
    resume_from = demo_checkpoint_to_resume(demo)
    if resume_from:
        logger.info("Resuming the demo from %s (pass --resume false to start over).", resume_from)
    run = run_pretrain(
        pretrain_args, demo_training_arguments(demo, resume_from), callbacks=(TimeBudgetCallback(demo.time_budget_s),)
    )
    tokenizer, model = load_checkpoint(str(export_dir))
    greedy = complete(model, tokenizer, demo.prompt, demo.max_new_tokens)
    tr_jacobi = complete(model, tokenizer, demo.prompt, demo.max_new_tokens, strategy="tr_jacobi")
    patch = run.get("patch_level")
    if patch is not None and patch["stage_reached"] == "patch":
        logger.warning(
            "The time budget stopped training in the patch-level stage (step %d): the model never trained at token level; "
            "raise --time_budget_s or lower --max_steps.",
            run["global_step"],
        )
    return {
        "pretraining": patch or "token-level",
        "parameters": run["parameters"],
        "optimizer_steps": run["global_step"],
        "resumed_from": resume_from,
        "tokens_seen": run["tokens_seen"],
        "corpus": run["corpus"],
        "validation_loss": run["metrics"].get("eval_loss"),
        "validation_perplexity": run["metrics"].get("eval_perplexity"),
        "export_dir": str(export_dir),
        "reloaded_class": type(model).__name__,
        "prompt": demo.prompt,
        "greedy_completion": greedy.text,
        "tr_jacobi_equals_greedy": tr_jacobi.text == greedy.text,
        "greedy_seconds": round(greedy.seconds, 3),
        "tr_jacobi_seconds": round(tr_jacobi.seconds, 3),
        "tr_jacobi_forwards": tr_jacobi.num_forwards,
        "tr_jacobi_tokens_per_forward": round(tr_jacobi.tokens_per_forward, 3),
        # one completion each: an illustration, not a benchmark (scripts/bench_decode.py measures speed)
        "tr_jacobi_speed_vs_greedy": round(greedy.seconds / tr_jacobi.seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str]) -> int:
    (demo,) = HfArgumentParser(DemoArguments, prog="effitrain demo").parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_demo(demo)
    summary_path = Path(demo.output_dir) / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    print(f"Summary written to {summary_path}")
    print(f"\n{demo.prompt}{summary['greedy_completion']}")
    return 0
