"""Make Some Noise (Wang et al., 2024): SFT on inputs with a noisy segment inside each completion, so that the model
can refine many draft tokens per forward (decoded by the Jacobi / TR-Jacobi loops in `hf_effitrain.hub`)."""

from .collator import MSNNoiseCollator, add_sample_index
from .config import NOISE_KINDS, NoisySFTConfig
from .job import SftArguments, run_sft
from .trainer import NoisySFTTrainer, add_noise

__all__ = [
    "MSNNoiseCollator",
    "NOISE_KINDS",
    "NoisySFTConfig",
    "NoisySFTTrainer",
    "SftArguments",
    "add_noise",
    "add_sample_index",
    "run_sft",
]
