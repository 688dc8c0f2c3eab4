"""The token budget of a patch-level run, split into a patch stage and a token stage, and its compute estimate.

The budget is what token-level training with the same arguments would consume:

    budget_steps  = max_steps                                        if max_steps > 0
                  = floor(num_train_epochs * num_blocks / global_batch)   otherwise
    budget_tokens = budget_steps * global_batch * block_size

with `global_batch = per_device_train_batch_size * gradient_accumulation_steps * world_size` sequences. A patch-stage
optimizer step consumes K times the tokens of a token-stage step (the same number of positions), so

    patch_steps = min(round(lambda * budget_steps / K), budget_steps // K)
    token_steps = budget_steps - K * patch_steps

and the run takes `patch_steps + token_steps` optimizer steps. The switch lands on a whole patch step; the lambda
actually used is `K * patch_steps / budget_steps` (logged).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch.nn as nn
from accelerate.utils import extract_model_from_parallel

__all__ = ["PatchSchedule", "training_flops_per_position"]

PATCH, TOKEN = "patch", "token"


@dataclass(frozen=True)
class PatchSchedule:
    """Where a run switches from patch to token level, in optimizer steps, and what each step costs."""

    patch_size: int
    patch_fraction: float
    block_size: int
    global_batch: int
    budget_steps: int
    patch_steps: int
    token_steps: int
    flops_per_position: float = 0.0

    @classmethod
    def plan(
        cls, *, patch_size: int, patch_fraction: float, block_size: int, global_batch: int, budget_steps: int,
        flops_per_position: float = 0.0,
    ) -> PatchSchedule:
        """Split `budget_steps` token-level steps into patch and token steps (see the module docstring).

        Raises:
            ValueError: when the budget is empty, or a patch stage was asked for but the budget holds no whole
                patch-level step (fewer than K token-level steps at this lambda).
        """
        if budget_steps < 1:
            raise ValueError(f"The token budget is {budget_steps} steps; set max_steps > 0 or enough data/epochs.")
        patch_steps = 0
        if patch_size > 1 and patch_fraction > 0:
            patch_steps = min(round(patch_fraction * budget_steps / patch_size), budget_steps // patch_size)
            if patch_steps < 1:
                raise ValueError(
                    f"patch_fraction={patch_fraction} of a {budget_steps}-step budget is less than one patch-level step "
                    f"(each consumes patch_size={patch_size} steps' worth of tokens); raise max_steps or patch_fraction."
                )
        return cls(
            patch_size=patch_size, patch_fraction=patch_fraction, block_size=block_size, global_batch=global_batch,
            budget_steps=budget_steps, patch_steps=patch_steps, token_steps=budget_steps - patch_size * patch_steps,
            flops_per_position=flops_per_position,
        )

    @property
    def total_steps(self) -> int:
        return self.patch_steps + self.token_steps

    @property
    def budget_tokens(self) -> int:
        return self.budget_steps * self.global_batch * self.block_size

    @property
    def effective_fraction(self) -> float:
        return self.patch_size * self.patch_steps / self.budget_steps

    def stage_of_next_step(self, global_step: int) -> str:
        """Stage of the optimizer step that runs after `global_step` steps are done."""
        return PATCH if global_step < self.patch_steps else TOKEN

    def stage_after(self, global_step: int) -> str:
        """Stage of the last finished step (the stage of what was just logged); before step 1, the first stage."""
        return PATCH if 0 < self.patch_steps and global_step <= self.patch_steps else TOKEN

    def tokens_after(self, global_step: int) -> int:
        """Training tokens consumed by the first `global_step` optimizer steps."""
        patch = min(global_step, self.patch_steps)
        return (patch * self.patch_size + global_step - patch) * self.global_batch * self.block_size

    def flops_after(self, global_step: int) -> float:
        """Estimated training FLOPs of the first `global_step` steps: both stages process block_size positions."""
        return global_step * self.global_batch * self.block_size * self.flops_per_position

    def progress(self, global_step: int) -> dict[str, float]:
        """The values logged at every logging step."""
        return {
            "patch_stage": float(self.stage_after(global_step) == PATCH),
            "train_tokens": float(self.tokens_after(global_step)),
            "train_flops": float(self.flops_after(global_step)),
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def mismatches(self, saved: dict) -> list[str]:
        """Fields of a saved schedule that differ from this one (compute estimate excluded)."""
        names = [f.name for f in fields(self) if f.name != "flops_per_position"]
        diffs = []
        for name in names:
            value = getattr(self, name)
            other = saved.get(name)
            same = math.isclose(value, other) if isinstance(value, float) and other is not None else value == other
            if not same:
                diffs.append(f"{name}: checkpoint {other!r}, now {value!r}")
        return diffs


def training_flops_per_position(model: nn.Module, context: int) -> float:
    """Training FLOPs per sequence position: `6 * N + 6 * n_layer * context * d_model` (Kaplan et al. 2020).

    N counts every parameter that multiplies activations: all parameters except embedding lookups, plus the LM head
    when it is tied to the input embeddings. The second term is the attention score and value products over a
    context of `context` positions (forward 2x, backward 4x). The patch averaging adds about K*H per position,
    which is negligible and not counted. With frozen weights (LoRA) the backward is cheaper than 2x forward, so
    this is an upper estimate there.
    """
    inner = extract_model_from_parallel(model)
    embedding_params = {id(p) for m in inner.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    seen: set[int] = set()
    count = 0
    for p in inner.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) not in embedding_params or (head_weight is not None and p is head_weight):
            count += p.numel()
    config = getattr(inner, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(config, "num_hidden_layers", 0) or 0
    width = getattr(config, "hidden_size", 0) or 0
    return 6.0 * count + 6.0 * layers * context * width
