"""Configuration of "Make Some Noise" (MSN) fine-tuning: trl's `SFTConfig` plus the noise options."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

__all__ = ["NOISE_KINDS", "NoisySFTConfig"]

NOISE_KINDS = ("ahead", "uniform")


@dataclass
class NoisySFTConfig(SFTConfig):
    """`SFTConfig` for `NoisySFTTrainer`: MSN replaces the SFT stage (Wang et al., 2024, arXiv 2406.17404).

    Each corrupted training sample gets exactly one contiguous segment of `noise_length` input tokens replaced inside
    its completion (the positions whose labels are not -100); the labels stay clean, so the model learns to predict
    the right next token after noisy context: the denoising ability Jacobi / TR-Jacobi decoding relies on.

    Args:
        noise_length (`int`, *optional*, defaults to `5`):
            Tokens per noise segment (L; the paper uses 5). `0` trains plain SFT.
        noise_fraction (`float`, *optional*, defaults to `1.0`):
            Probability that a training sample is corrupted (the paper corrupts every sample).
        noise_kind (`str`, *optional*, defaults to `"ahead"`):
            `"ahead"`: each noisy token is a copy of a uniformly random earlier token of the same sequence (the
            paper's, matching the drafts of Jacobi decoding); `"uniform"`: a uniformly random vocabulary id.
    """

    noise_length: int = field(default=5, metadata={"help": "Tokens per noise segment (L); 0 trains plain SFT."})
    noise_fraction: float = field(default=1.0, metadata={"help": "Probability that a training sample is corrupted."})
    noise_kind: str = field(default="ahead", metadata={"help": "Noise tokens: 'ahead' (copies of earlier tokens) or 'uniform'.", "choices": list(NOISE_KINDS)})

    def __post_init__(self):
        if isinstance(self.noise_length, bool) or not isinstance(self.noise_length, int) or self.noise_length < 0:
            raise ValueError(f"noise_length must be a non-negative int (0 = plain SFT), got {self.noise_length!r}.")
        if not 0.0 <= float(self.noise_fraction) <= 1.0:
            raise ValueError(f"noise_fraction must be in [0, 1], got {self.noise_fraction!r}.")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {list(NOISE_KINDS)}, got {self.noise_kind!r}.")
        super().__post_init__()
