"""The token budget of a patch-level run, split into a patch stage and a token stage, and its compute estimate.

The budget is what token-level training with the same arguments would consume:

    budget_steps  = max_steps                                        if max_steps > 0
                  = floor(num_train_epochs * num_blocks / global_batch)   otherwise
    budget_tokens = budget_steps * global_batch * block_size

with `global_batch = per_device_train_batch_size * gradient_accumulation_steps * world_size` sequences. How a
patch-stage optimizer step is batched (`patch_batching`) decides how many steps the patch stage takes:

- `"equal_tokens"` (default, the authors' recipe): a patch step takes `global_batch / K` sequences of K*T tokens,
  i.e. the same `global_batch * T` tokens as a token step and 1/K of its positions, so

      patch_steps = round(lambda * budget_steps),   token_steps = budget_steps - patch_steps

  and the run takes `budget_steps` (= `max_steps`) optimizer steps.
- `"equal_positions"`: a patch step takes `global_batch` sequences of K*T tokens (the positions of a token step,
  K times its tokens), so

      patch_steps = min(round(lambda * budget_steps / K), budget_steps // K),   token_steps = budget_steps - K * patch_steps

  and the run takes `patch_steps + token_steps` optimizer steps.

Either way the first lambda of the tokens are read at patch level; the lambda actually used (the switch lands on a
whole step) is `effective_fraction` (logged). Compute follows positions: lambda/K + 1 - lambda of the token-level run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch.nn as nn
from accelerate.utils import extract_model_from_parallel

__all__ = ["PatchSchedule", "training_flops_per_position"]

PATCH, TOKEN = "patch", "token"
EQUAL_TOKENS, EQUAL_POSITIONS = "equal_tokens", "equal_positions"  # `PatchTrainingArguments.patch_batching`
LEGACY_BATCHING = EQUAL_POSITIONS  # schedules saved before `batching` was recorded were batched this way


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
    batching: str = EQUAL_TOKENS
    flops_per_position: float = 0.0

    @classmethod
    def plan(
        cls,
        *,
        patch_size: int,
        patch_fraction: float,
        block_size: int,
        global_batch: int,
        budget_steps: int,
        batching: str = EQUAL_TOKENS,
        flops_per_position: float = 0.0,
    ) -> PatchSchedule:
        """Split `budget_steps` token-level steps into patch and token steps (see the module docstring).

        Raises:
            ValueError: when the budget is empty, `batching` is unknown, `"equal_tokens"` meets a global batch that is
                not a multiple of K, or a patch stage was asked for but the budget holds no whole patch-level step.
        """
        if budget_steps < 1:
            raise ValueError(f"The token budget is {budget_steps} steps; set max_steps > 0 or enough data/epochs.")
        if batching not in (EQUAL_TOKENS, EQUAL_POSITIONS):
            raise ValueError(f"batching must be one of {[EQUAL_TOKENS, EQUAL_POSITIONS]}, got {batching!r}.")
        patch_steps, cost = 0, patch_size if batching == EQUAL_POSITIONS else 1
        if patch_size > 1 and patch_fraction > 0:
            if batching == EQUAL_TOKENS and global_batch % patch_size:
                raise ValueError(
                    f"batching='equal_tokens' needs the global batch ({global_batch} sequences) to be a multiple of "
                    f"patch_size={patch_size}: a patch step takes global_batch / patch_size sequences of K x T tokens."
                )
            patch_steps = min(round(patch_fraction * budget_steps / cost), budget_steps // cost)
            if patch_steps < 1:
                raise ValueError(
                    f"patch_fraction={patch_fraction} of a {budget_steps}-step budget is less than one patch-level step "
                    f"(each consumes {cost} token-level steps' worth of tokens); raise max_steps or patch_fraction."
                )
        return cls(
            patch_size=patch_size,
            patch_fraction=patch_fraction,
            block_size=block_size,
            global_batch=global_batch,
            budget_steps=budget_steps,
            patch_steps=patch_steps,
            token_steps=budget_steps - cost * patch_steps,
            batching=batching,
            flops_per_position=flops_per_position,
        )

    @property
    def total_steps(self) -> int:
        return self.patch_steps + self.token_steps

    @property
    def budget_tokens(self) -> int:
        return self.budget_steps * self.global_batch * self.block_size

    @property
    def patch_step_cost(self) -> int:
        """Token-level steps' worth of tokens one patch-stage step consumes (1 with equal tokens, K with equal positions)."""
        return self.patch_size if self.batching == EQUAL_POSITIONS else 1

    @property
    def patch_sequences_per_step(self) -> int:
        """K*T-token sequences in one patch-stage optimizer step (all devices and micro-batches together)."""
        return self.global_batch * self.patch_step_cost // self.patch_size

    @property
    def effective_fraction(self) -> float:
        return self.patch_step_cost * self.patch_steps / self.budget_steps

    def steps_for_budget(self, budget_steps: int, start_step: int = 0) -> int:
        """Optimizer steps, counted from `start_step`, that consume `budget_steps` token-level steps' worth of tokens.

        A warmup given in steps means tokens: with equal-positions batching a patch step holds K steps' worth, so
        2000 warmup steps from step 0 are `ceil(2000 / K)` patch steps (or, past the switch, the rest at one each).
        """
        patch_left = max(self.patch_steps - start_step, 0)
        cost = self.patch_step_cost
        if budget_steps <= patch_left * cost:
            return math.ceil(budget_steps / cost)
        return patch_left + budget_steps - patch_left * cost

    def stage_of_next_step(self, global_step: int) -> str:
        """Stage of the optimizer step that runs after `global_step` steps are done."""
        return PATCH if global_step < self.patch_steps else TOKEN

    def stage_after(self, global_step: int) -> str:
        """Stage of the last finished step (the stage of what was just logged); before step 1, the first stage."""
        return PATCH if 0 < self.patch_steps and global_step <= self.patch_steps else TOKEN

    def tokens_after(self, global_step: int) -> int:
        """Training tokens consumed by the first `global_step` optimizer steps."""
        patch = min(global_step, self.patch_steps)
        return (patch * self.patch_step_cost + global_step - patch) * self.global_batch * self.block_size

    def positions_after(self, global_step: int) -> int:
        """Sequence positions processed by the first `global_step` steps (a patch-stage sequence has T positions)."""
        patch = min(global_step, self.patch_steps)
        return (patch * self.patch_sequences_per_step + (global_step - patch) * self.global_batch) * self.block_size

    def flops_after(self, global_step: int) -> float:
        """Estimated training FLOPs of the first `global_step` steps: FLOPs per position x positions processed."""
        return self.positions_after(global_step) * self.flops_per_position

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
            other = saved.get(name, LEGACY_BATCHING if name == "batching" else None)
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
    embedding_params = {
        id(p) for m in inner.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
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
