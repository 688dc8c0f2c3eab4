"""`effitrain generate`: complete a prompt with a checkpoint, optionally with a decoding strategy."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, TextStreamer

from hf_effitrain.data.tokenizer import load_tokenizer
from hf_effitrain.models.presets import parse_config_overrides

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerateArguments:
    """Options of `effitrain generate`."""

    checkpoint: str = field(metadata={"help": "Exported checkpoint folder (safetensors weights + tokenizer)."})
    prompt: str | None = field(default=None, metadata={"help": "Prompt text; default: read standard input."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens to generate."})
    strategy: str | None = field(
        default=None, metadata={"help": "Decoding strategy: jacobi, tr_jacobi, cascade; default plain greedy."}
    )
    generate_kwargs: str | None = field(
        default=None,
        metadata={"help": "Extra generate() arguments as key=value pairs, e.g. 'num_steps=4,tree_depth=4'."},
    )
    dtype: str = field(default="float32", metadata={"help": f"Weights dtype: one of {sorted(_DTYPES)}."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu' or 'cuda[:N]'."})
    stream: bool = field(default=False, metadata={"help": "Print tokens as they are accepted (TextStreamer)."})

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; valid dtypes are {sorted(_DTYPES)}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        check_device(self.device)
        if self.prompt is not None and not self.prompt:
            raise ValueError(
                "prompt is empty; give the text to complete (or leave --prompt out to read standard input)."
            )


def check_device(device: str) -> None:
    """Refuse a device this machine cannot use, naming what is allowed."""
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and not index.isdigit()) or (kind != "cuda" and index):
        raise ValueError(f"Unknown device {device!r}; valid devices are 'auto', 'cpu', 'cuda' and 'cuda:N'.")
    if kind == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (index and int(index) >= count):
            raise ValueError(
                f"device {device!r} is not available: this machine has {count} CUDA device(s); use 'cpu' or 'auto'."
            )


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32, device: str = "auto"):
    """Tokenizer and model of an exported checkpoint, with its remote code (safetensors weights required)."""
    from hf_effitrain.export import require_safetensors

    require_safetensors(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).to(device).eval()
    return tokenizer, model


@dataclass
class Completion:
    """One completion: the new text, the seconds `generate` took and, for Jacobi strategies, the forwards it ran."""

    text: str
    seconds: float
    num_forwards: int | None = None
    tokens_per_forward: float | None = None


def complete(
    model, tokenizer, prompt: str, max_new_tokens: int, strategy: str | None = None, streamer=None, **kwargs
) -> Completion:
    """Greedy completion of `prompt` (with `strategy` if given), timed, with the strategy's statistics if it has any."""
    from hf_effitrain.hub.generation_effi import generate

    encoded = tokenizer(prompt, return_tensors="pt").to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = generate(
            model,
            encoded["input_ids"],
            strategy=strategy,
            attention_mask=encoded["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            return_dict_in_generate=True,
            **kwargs,
        )
    seconds = time.perf_counter() - start
    text = tokenizer.decode(output.sequences[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return Completion(text, seconds, getattr(output, "num_forwards", None), getattr(output, "tokens_per_forward", None))


def main(argv: list[str]) -> int:
    (args,) = HfArgumentParser(GenerateArguments, prog="effitrain generate").parse_args_into_dataclasses(args=argv)
    tokenizer, model = load_checkpoint(args.checkpoint, _DTYPES[args.dtype], args.device)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ValueError("the prompt read from standard input is empty; give the text to complete.")
    streamer = TextStreamer(tokenizer, skip_prompt=True) if args.stream else None
    completion = complete(
        model,
        tokenizer,
        prompt,
        args.max_new_tokens,
        args.strategy,
        streamer,
        **parse_config_overrides(args.generate_kwargs),
    )
    if not args.stream:
        print(prompt + completion.text)
    stats = {"strategy": args.strategy or "greedy", "seconds": round(completion.seconds, 4)}
    if completion.num_forwards is not None:
        stats.update(num_forwards=completion.num_forwards, tokens_per_forward=round(completion.tokens_per_forward, 3))
    print(json.dumps(stats), file=sys.stderr)
    return 0
