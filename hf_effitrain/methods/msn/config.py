"""Configuration of "Make Some Noise" (MSN) fine-tuning: trl's `SFTConfig` plus the noise options."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import SFTConfig

__all__ = ["NOISE_KINDS", "NoisySFTConfig"]

NOISE_KINDS = ("ahead", "uniform")


@dataclass
class NoisySFTConfig(SFTConfig):
    """`SFTConfig` for `NoisySFTTrainer`: MSN replaces the SFT stage (Wang et al., 2024, arXiv 2406.17404).

    Each corrupted training sample gets exactly one contiguous segment of `noise_length` input tokens replaced inside
    its completion (the positions whose labels are not -100); the labels stay clean, so the model learns to predict
    the right next token after noisy context: the denoising ability Jacobi / TR-Jacobi decoding relies on. The noise
    is drawn on the CPU by `MSNNoiseCollator` and keyed on (`seed`, the sample's index in the training set, the
    epoch), so a resumed run draws the same noise.

    Args:
        noise_length (`int`, *optional*, defaults to `5`):
            Tokens per noise segment (L; the paper uses 5). `0` trains plain SFT.
        noise_fraction (`float`, *optional*, defaults to `1.0`):
            Probability that a training sample is corrupted (the paper corrupts every sample).
        noise_kind (`str`, *optional*, defaults to `"ahead"`):
            `"ahead"`: each noisy token is a copy of a uniformly random earlier token of the same sequence (the
            paper's, matching the drafts of Jacobi decoding); `"uniform"`: a uniformly random vocabulary id.

    `bf16` unset (None) means "where it works": True on a CUDA device with bf16 support (unless `fp16` or `use_cpu`
    is set), else False, so the defaults also run on a CPU machine. trl's own default would be True everywhere, which
    fails on a CPU-only machine; an explicit `bf16=True` keeps trl's / transformers' check.
    """

    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 (mixed) precision. If not set: on for a CUDA GPU with bf16 support (unless fp16 or use_cpu "
            "is set), off otherwise, e.g. on a CPU-only machine."
        },
    )
    noise_length: int = field(default=5, metadata={"help": "Tokens per noise segment (L); 0 trains plain SFT."})
    noise_fraction: float = field(default=1.0, metadata={"help": "Probability that a training sample is corrupted."})
    noise_kind: str = field(
        default="ahead",
        metadata={
            "help": "Noise tokens: 'ahead' (copies of earlier tokens) or 'uniform'.",
            "choices": list(NOISE_KINDS),
        },
    )

    def __post_init__(self):
        if isinstance(self.noise_length, bool) or not isinstance(self.noise_length, int) or self.noise_length < 0:
            raise ValueError(f"noise_length must be a non-negative int (0 = plain SFT), got {self.noise_length!r}.")
        if not 0.0 <= float(self.noise_fraction) <= 1.0:
            raise ValueError(f"noise_fraction must be in [0, 1], got {self.noise_fraction!r}.")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {list(NOISE_KINDS)}, got {self.noise_kind!r}.")
        if self.bf16 is None:  # trl would resolve None to `not fp16`, i.e. True on a CPU-only machine too
            self.bf16 = bool(
                not self.fp16 and not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            )
        super().__post_init__()
