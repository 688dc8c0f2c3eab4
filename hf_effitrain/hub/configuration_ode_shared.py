"""Configuration of the ODE-shared decoder: a Llama-style model whose shared blocks are integrated over depth.

Ships inside checkpoints: imports only the standard library, torch-free transformers config code and nothing else.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

SOLVERS: dict[str, int] = {"euler": 1, "heun": 2, "midpoint": 2}
"""Solver name -> evaluations of the shared block per step (each evaluation owns its own KV-cache slots)."""

TRAIN_STEP_SCHEDULES: tuple[str, ...] = ("fixed", "random")


def _as_per_block(value, num_blocks: int, name: str, integer: bool) -> list:
    """Split a scalar total evenly over `num_blocks`, or check that a list has one entry per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_blocks:
            raise ValueError(
                f"`{name}` has {len(value)} entries but the model has num_shared_blocks={num_blocks}; give one per block or a single total."
            )
        return list(value)
    if integer:
        if value % num_blocks != 0:
            raise ValueError(
                f"`{name}`={value} (a total over all shared blocks) is not divisible by num_shared_blocks={num_blocks}; give a list with one value per block."
            )
        return [value // num_blocks] * num_blocks
    return [value / num_blocks] * num_blocks


def resolve_block_steps(num_steps, num_blocks: int, name: str = "num_steps") -> list[int]:
    """Per-block solver steps from a total (int) or a per-block list, with a ValueError for anything below 1."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, list, tuple)):
        raise TypeError(f"`{name}` must be an int or a list of ints, got {num_steps!r}.")
    steps = _as_per_block(num_steps, num_blocks, name, integer=True)
    for value in steps:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"`{name}` must give every shared block an integer number of steps >= 1, got {num_steps!r}."
            )
    return steps


def _parse_int_list(text: str, name: str) -> list[int]:
    """`"2 4 8"`, `"2|4|8"` or `"2/4/8"` -> `[2, 4, 8]`: lists survive `--config-overrides "k=v,k2=v2"` this way."""
    parts = text.replace("|", " ").replace("/", " ").replace(";", " ").split()
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"`{name}`={text!r} is not a list of integers; write e.g. '2|4|8'.") from None


@strict
class OdeSharedConfig(PreTrainedConfig):
    r"""
    Configuration of [`OdeSharedForCausalLM`]: a pre-norm Llama-style decoder where `num_pre_layers` unshared
    layers feed `num_shared_blocks` shared blocks (each `shared_block_layers` layers that share weights across
    depth) followed by `num_post_layers` unshared layers. Each shared block is read as the vector field `F` of
    `dx/dt = F(x)` (Chen et al. 2023, "Boosting inference efficiency of parameter-shared PLMs") and integrated
    over its depth interval with a solver, so the number of steps, and with it the compute, is chosen per call.

    `F(x) = B(x) - x` is the block's residual update at unit step (for one Llama layer: the attention branch
    plus the MLP branch evaluated after it). Euler with step `h` gives `x <- x + h * F(x)`; with `h = 1` a
    block is the plain residual stack.

    Args:
        vocab_size, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, hidden_act,
        max_position_embeddings, initializer_range, rms_norm_eps, use_cache, pad_token_id, bos_token_id,
        eos_token_id, tie_word_embeddings, rope_parameters, attention_bias, attention_dropout, mlp_bias, head_dim:
            As in [`LlamaConfig`].
        num_hidden_layers (`int`, *optional*):
            Number of distinct (parameter-owning) layers: `num_pre_layers + num_shared_blocks *
            shared_block_layers + num_post_layers`. Derived when left `None`; a given value must add up.
        num_pre_layers (`int`, *optional*, defaults to 0):
            Unshared layers before the shared blocks (partial sharing).
        num_post_layers (`int`, *optional*, defaults to 0):
            Unshared layers after the shared blocks.
        shared_block_layers (`int`, *optional*, defaults to 1):
            Layers inside one shared block; one solver evaluation runs all of them once.
        num_shared_blocks (`int`, *optional*, defaults to 1):
            Shared blocks applied one after the other, each over its own sub-interval with its own weights.
        num_steps (`int` or `list[int]`, *optional*, defaults to 6):
            Default solver steps: an int is the total over all shared blocks (split evenly), a list gives one
            value per block. `forward(num_steps=...)` and `generate(num_steps=...)` override it per call.
        ode_interval (`float` or `list[float]`, *optional*):
            Depth interval integrated by the shared blocks, in units of block applications: a number is the
            total (split evenly), a list gives one per block. Defaults to `num_steps`, i.e. step size 1 at the
            default steps. The step size of a call is `interval / steps` for each block.
        solver (`str`, *optional*, defaults to `"euler"`):
            `"euler"` (1 block evaluation per step), `"heun"` or `"midpoint"` (2 evaluations per step, second
            order). Every evaluation takes its own KV-cache slots.
        train_step_schedule (`str`, *optional*, defaults to `"fixed"`):
            Steps used by `forward` in training mode when the call gives no `num_steps`: `"fixed"` uses
            `train_num_steps`; `"random"` draws one value of `train_num_steps_choices` per batch (robust
            pre-training: the model learns the same interval at several step sizes).
        train_num_steps (`int` or `list[int]`, *optional*):
            Steps of the `"fixed"` schedule; defaults to `num_steps`. A larger value trains with a smaller step.
        train_num_steps_choices (`list[int]`, *optional*):
            Totals the `"random"` schedule draws from (uniformly, one per batch); each must split evenly over the
            blocks. A string such as `"2|4|8"` is accepted (for `--config-overrides`). Defaults to `[num_steps, num_steps // 2, num_steps // 4]` (values >= 1, deduplicated).
        train_step_seed (`int`, *optional*):
            Seed of the dedicated generator of the `"random"` schedule; `None` draws from torch's global RNG, which
            `Trainer` seeds and restores on resume.
        step_aware (`bool`, *optional*, defaults to `False`):
            Condition every shared layer on where its evaluation sits on its block's interval (`t / interval`) and
            on the step size (`h / interval`): a sinusoidal embedding of both feeds a small MLP whose zero-initialised
            output gives a per-channel scale and shift of the layer's two normed inputs and a gate of its two
            branches (adaLN-zero, as in DiT; LoopFormer conditions loops on t and h the same way). At
            initialisation the model computes exactly what the plain one does; checkpoints without these weights
            load unchanged with the default `False`.
        step_embedding_dim (`int`, *optional*, defaults to 32):
            Width of the sinusoidal embedding of each of `t` and `h`, and of the conditioning MLP's hidden layer
            (an even number). Adds `2 * d**2 + d + 6 * hidden_size * (d + 1)` parameters per shared layer.
        consistency_weight (`float`, *optional*, defaults to 0.0):
            Weight of the step-consistency term added to the LM loss in training mode when `labels` are given:
            from a state `x_k` of the trajectory (inputs detached), one solver step of size `2h` is trained towards
            the stop-gradient state `x_{k+2}` the trajectory reached with two steps of size `h` (shortcut
            consistency). The distance is the squared error relative to the target's squared norm, per token,
            normalised like the LM loss. `0` switches it off (no extra compute).
        consistency_samples (`int`, *optional*, defaults to 1):
            Start states `x_k` drawn (uniformly, without replacement) per shared block and training batch, each
            costing one extra solver step; capped at `steps - 1`, so a large value uses every start state. A
            batch whose block takes a single step adds no term for that block.

    ```python
    >>> from hf_effitrain import OdeSharedConfig, OdeSharedForCausalLM
    >>> config = OdeSharedConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_steps=4)
    >>> model = OdeSharedForCausalLM(config)
    >>> config.num_hidden_layers
    1
    ```"""

    model_type = (
        "effi_ode_shared"  # namespaced: a checkpoint saved as "ode_shared" still loads (see hf_effitrain.registry)
    )
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        "*.self_attn.q_proj": "colwise",
        "*.self_attn.k_proj": "colwise",
        "*.self_attn.v_proj": "colwise",
        "*.self_attn.o_proj": "rowwise",
        "*.mlp.gate_proj": "colwise",
        "*.mlp.up_proj": "colwise",
        "*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int | None = None
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    head_dim: int | None = None

    num_pre_layers: int = 0
    num_post_layers: int = 0
    shared_block_layers: int = 1
    num_shared_blocks: int = 1
    num_steps: int | list[int] = 6
    ode_interval: int | float | list[int | float] | None = None
    solver: str = "euler"
    train_step_schedule: str = "fixed"
    train_num_steps: int | list[int] | None = None
    train_num_steps_choices: list[int] | str | None = None
    train_step_seed: int | None = None
    step_aware: bool = False
    step_embedding_dim: int = 32
    consistency_weight: int | float = 0.0
    consistency_samples: int = 1

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if isinstance(self.train_num_steps_choices, str):
            self.train_num_steps_choices = _parse_int_list(self.train_num_steps_choices, "train_num_steps_choices")
        self._check_sharing()
        if self.ode_interval is None:  # step size 1 at the default steps, in every block
            steps = self.block_steps()
            self.ode_interval = [float(n) for n in steps] if len(steps) > 1 else float(steps[0])
        self._check_solver_settings()
        super().__post_init__(**kwargs)

    def _check_sharing(self) -> None:
        counts = {
            "num_pre_layers": (self.num_pre_layers, 0),
            "num_post_layers": (self.num_post_layers, 0),
            "shared_block_layers": (self.shared_block_layers, 1),
            "num_shared_blocks": (self.num_shared_blocks, 1),
        }
        for name, (value, minimum) in counts.items():
            if value < minimum:
                raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
        unique = self.num_pre_layers + self.num_shared_blocks * self.shared_block_layers + self.num_post_layers
        if self.num_hidden_layers is None:
            self.num_hidden_layers = unique
        elif self.num_hidden_layers != unique:
            raise ValueError(
                f"Sharing settings do not add up: num_pre_layers ({self.num_pre_layers}) + num_shared_blocks "
                f"({self.num_shared_blocks}) * shared_block_layers ({self.shared_block_layers}) + num_post_layers "
                f"({self.num_post_layers}) = {unique} distinct layers, but num_hidden_layers={self.num_hidden_layers}. "
                "Leave num_hidden_layers unset to derive it."
            )

    def _check_solver_settings(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"Unknown solver {self.solver!r}; valid solvers are {sorted(SOLVERS)}.")
        for interval in self.block_intervals():
            if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
                raise ValueError(f"`ode_interval` must be positive for every shared block, got {self.ode_interval!r}.")
        if self.train_step_schedule not in TRAIN_STEP_SCHEDULES:
            raise ValueError(
                f"Unknown train_step_schedule {self.train_step_schedule!r}; valid schedules are {list(TRAIN_STEP_SCHEDULES)}."
            )
        if self.train_num_steps is not None:
            resolve_block_steps(self.train_num_steps, self.num_shared_blocks, "train_num_steps")
        for choice in self.step_choices():
            resolve_block_steps(choice, self.num_shared_blocks, "train_num_steps_choices")
        self._check_step_training_settings()

    def _check_step_training_settings(self) -> None:
        if isinstance(self.step_embedding_dim, bool) or self.step_embedding_dim < 2 or self.step_embedding_dim % 2:
            raise ValueError(f"`step_embedding_dim` must be an even integer >= 2, got {self.step_embedding_dim!r}.")
        if isinstance(self.consistency_weight, bool) or not self.consistency_weight >= 0:
            raise ValueError(
                f"`consistency_weight` must be a number >= 0 (0 switches the term off), got {self.consistency_weight!r}."
            )
        if isinstance(self.consistency_samples, bool) or self.consistency_samples < 1:
            raise ValueError(f"`consistency_samples` must be an integer >= 1, got {self.consistency_samples!r}.")

    def block_steps(self, num_steps: int | list[int] | None = None) -> list[int]:
        """Solver steps per shared block for a call's `num_steps` (default: the config's)."""
        return resolve_block_steps(self.num_steps if num_steps is None else num_steps, self.num_shared_blocks)

    def block_intervals(self) -> list[float]:
        """Depth interval integrated by each shared block."""
        return _as_per_block(self.ode_interval, self.num_shared_blocks, "ode_interval", integer=False)

    def step_choices(self) -> list[int | list[int]]:
        """Values the `"random"` training schedule draws from."""
        if self.train_num_steps_choices is not None:
            if len(self.train_num_steps_choices) == 0:
                raise ValueError("`train_num_steps_choices` must not be empty.")
            return list(self.train_num_steps_choices)
        if not isinstance(self.num_steps, int):
            return [self.num_steps]
        choices = [
            self.num_steps // d
            for d in (1, 2, 4)
            if self.num_steps // d >= 1 and (self.num_steps // d) % self.num_shared_blocks == 0
        ]
        return list(dict.fromkeys(choices))


# `save_pretrained` records the class in `auto_map`, so a checkpoint loads with `trust_remote_code=True`.
OdeSharedConfig.register_for_auto_class()

__all__ = ["OdeSharedConfig", "SOLVERS", "TRAIN_STEP_SCHEDULES", "resolve_block_steps"]
