"""ODE-shared decoder (Chen et al. 2023): shared pre-norm blocks integrated over depth with a chosen number of steps.

A shared block `B` (one or a few Llama-style layers) defines the vector field `F(x) = B(x) - x` of `dx/dt = F(x)`.
Integrating the block's depth interval `T` with `n` Euler steps of size `h = T / n` applies `x <- x + h * F(x)`
`n` times, so `n` (hence the layer compute) is chosen per call: `model(ids, num_steps=n)`,
`model.generate(ids, num_steps=n)`. With `h = 1` the block is the plain residual stack it was trained as.

Every residual update is applied together with the RMSNorm that reads it next (`OdeStepRMSNorm`, the hook for a
fused kernel), so a layer takes the pending update `(base, update, step_size)` of the previous evaluation.

KV cache: every evaluation of a layer (a solver step of a shared block, twice per step for the second-order
solvers) writes its own cache slot, since each sees a different residual stream. A cache therefore belongs to one
step layout; the model records it on the cache and refuses a later call with different `num_steps`.

Step-aware blocks (`config.step_aware`): each shared layer reads the position `t / interval` of its evaluation
and the step size `h / interval` through `OdeStepConditioning`, zero-initialised so that an untrained step-aware
model equals the plain one. Step consistency (`config.consistency_weight`): in training, one step of size `2h`
from a trajectory state is trained towards the (stop-gradient) state two steps of size `h` reached.

Ships inside checkpoints: imports only torch, transformers and single-dot siblings.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.output_capturing import capture_outputs

from .configuration_ode_shared import SOLVERS, OdeSharedConfig
from .generation_effi import EffiGenerationMixin
from .transformers_compat import (
    cache_output_field,
    cache_param_name,
    kernel_layer,
    merge_cache_arguments,
    output_cache,
    slice_logits_to_keep,
)

logger = logging.get_logger(__name__)

# A pending residual update: the next layer's input is `base + step_size * update` (`update=None`: input is `base`).
PendingUpdate = tuple[torch.Tensor, torch.Tensor | None, float]
# Where a shared-block evaluation sits: (t / interval, h / interval), both in (0, 1] for h and [0, 1] for t.
StepCondition = tuple[float, float]


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalise in float32, cast back, scale by `weight`."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


@kernel_layer("EffiOdeStepRMSNorm")
class OdeStepRMSNorm(nn.Module):
    """x_new = x + step_size * update; returns (x_new, rms_norm(x_new) * weight).

    One module for the solver's residual update and the RMSNorm that reads it, so a kernel (`EffiOdeStepRMSNorm`)
    can fuse both passes over the hidden states. This eager forward is the reference.
    """

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states, update, step_size: float) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states + step_size * update
        return hidden_states, rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class OdeSharedAttention(nn.Module):
    """Llama attention whose KV-cache slot is given per call, because a shared layer is evaluated many times."""

    def __init__(self, config: OdeSharedConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache_slot: int = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        # (batch, heads, seq, head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, cache_slot)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


def _sinusoid(position: float, step: float, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal features of `(t, h)` (DiT's timestep embedding of `1000 * t` and of `1000 * h`), shape `(2 * dim,)`.

    Parameter-free constants, cached per (t, h, device, dtype) so a decode step reuses the prefill's; the key holds
    the inference-mode flag because an inference tensor cannot enter a later autograd graph.
    """
    return _cached_sinusoid(position, step, dim, device, dtype, torch.is_inference_mode_enabled())


@functools.lru_cache(maxsize=4096)
def _cached_sinusoid(
    position: float, step: float, dim: int, device: torch.device, dtype: torch.dtype, inference: bool
) -> torch.Tensor:
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = torch.tensor([1000.0 * position, 1000.0 * step])[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).reshape(-1).to(device=device, dtype=dtype)


class OdeStepConditioning(nn.Module):
    """(t, h) -> per-channel shift/scale of a shared layer's two normed inputs and gates of its two branches.

    `sinusoid(t, h) -> Linear -> SiLU -> (out_weight, out_bias)`, the output projection zero-initialised
    (adaLN-zero), so an untrained conditioning leaves the layer exactly as it is. The output projection is held as
    plain parameters of this module (not a child `nn.Linear`) so that `_init_weights` zero-initialises it also
    when weights are loaded into remote code.
    """

    def __init__(self, config: OdeSharedConfig):
        super().__init__()
        dim = config.step_embedding_dim
        self.embedding_dim = dim
        self.proj_in = nn.Linear(2 * dim, dim)
        self.act = nn.SiLU()
        self.out_weight = nn.Parameter(torch.zeros(6 * config.hidden_size, dim))
        self.out_bias = nn.Parameter(torch.zeros(6 * config.hidden_size))

    def forward(self, condition: StepCondition, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns `(shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp)`, each `(hidden_size,)`."""
        features = _sinusoid(
            float(condition[0]), float(condition[1]), self.embedding_dim, like.device, self.proj_in.weight.dtype
        )
        hidden = self.act(self.proj_in(features))
        return nn.functional.linear(hidden, self.out_weight, self.out_bias).to(like.dtype).chunk(6, dim=-1)

    def extra_repr(self):
        return f"embedding_dim={self.embedding_dim}, out_features={self.out_bias.shape[0]}"


class OdeSharedDecoderLayer(GradientCheckpointingLayer):
    """A pre-norm Llama layer written as a vector field: it returns its residual update instead of adding it.

    Called with the pending update of the previous evaluation, it returns `(x, F(x))` where `x = base +
    step_size * update` is its input point and `F(x) = attn(norm(x)) + mlp(norm(x + attn(norm(x))))`.
    """

    def __init__(self, config: OdeSharedConfig, step_aware: bool = False):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = OdeSharedAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = OdeStepRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = OdeStepRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.step_conditioning = OdeStepConditioning(config) if step_aware else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        update: torch.Tensor | None = None,
        step_size: float = 1.0,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        cache_slot: int = 0,
        step_condition: StepCondition | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if update is None:
            normed = rms_norm(hidden_states, self.input_layernorm.weight, self.input_layernorm.variance_epsilon)
        else:
            hidden_states, normed = self.input_layernorm(hidden_states, update, step_size)
        modulation = self._modulation(step_condition, hidden_states)
        if modulation is not None:
            shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = modulation
            normed = normed * (1 + scale_attn) + shift_attn
        attn_output, _ = self.self_attn(
            normed,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            cache_slot=cache_slot,
            **kwargs,
        )
        if modulation is None:
            _, normed = self.post_attention_layernorm(hidden_states, attn_output, 1.0)
            return hidden_states, attn_output + self.mlp(normed)
        attn_output = attn_output * (1 + gate_attn)
        _, normed = self.post_attention_layernorm(hidden_states, attn_output, 1.0)
        return hidden_states, attn_output + self.mlp(normed * (1 + scale_mlp) + shift_mlp) * (1 + gate_mlp)

    def _modulation(self, step_condition: StepCondition | None, like: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The step conditioning's six vectors for this evaluation (None for a layer that is not step-aware)."""
        if self.step_conditioning is None:
            return None
        if step_condition is None:
            raise ValueError("A step-aware shared layer needs `step_condition=(t / interval, h / interval)`.")
        return self.step_conditioning(step_condition, like)


class OdeSharedPreTrainedModel(PreTrainedModel):
    config: OdeSharedConfig
    config_class = OdeSharedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OdeSharedDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"attentions": OdeSharedAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, OdeStepConditioning):  # adaLN-zero: an untrained conditioning changes nothing
            init.zeros_(module.out_weight)
            init.zeros_(module.out_bias)


@dataclass
class OdeSharedModelOutput(BaseModelOutputWithPast):
    r"""
    consistency_loss (`torch.FloatTensor` of shape `()`, *optional*):
        The step-consistency term (unweighted), when the forward was asked for it in training mode.
    """

    consistency_loss: torch.FloatTensor | None = None


@dataclass
class OdeSharedCausalLMOutput(CausalLMOutputWithPast):
    r"""
    lm_loss (`torch.FloatTensor` of shape `()`, *optional*):
        The language-modeling loss alone; `loss` adds `config.consistency_weight * consistency_loss` to it.
    consistency_loss (`torch.FloatTensor` of shape `()`, *optional*):
        The step-consistency term (unweighted), computed in training mode with `labels` when the weight is > 0.
    """

    lm_loss: torch.FloatTensor | None = None
    consistency_loss: torch.FloatTensor | None = None


class OdeSharedModel(OdeSharedPreTrainedModel):
    """The decoder stack: unshared pre layers, shared blocks integrated with the configured solver, post layers."""

    def __init__(self, config: OdeSharedConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.pre_layers = nn.ModuleList([OdeSharedDecoderLayer(config) for _ in range(config.num_pre_layers)])
        self.shared_blocks = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        OdeSharedDecoderLayer(config, step_aware=config.step_aware)
                        for _ in range(config.shared_block_layers)
                    ]
                )
                for _ in range(config.num_shared_blocks)
            ]
        )
        self.post_layers = nn.ModuleList([OdeSharedDecoderLayer(config) for _ in range(config.num_post_layers)])
        self.norm = OdeStepRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self._train_step_generator: torch.Generator | None = None
        self._consistency_generator: torch.Generator | None = None
        self.post_init()

    def cache_slots(self, block_steps: list[int]) -> int:
        """Number of KV-cache slots (layer evaluations) one forward takes with `block_steps` steps per block."""
        per_step = SOLVERS[self.config.solver] * self.config.shared_block_layers
        return self.config.num_pre_layers + per_step * sum(block_steps) + self.config.num_post_layers

    def resolve_num_steps(self, num_steps: int | list[int] | None) -> list[int]:
        """Steps per shared block for this call: explicit, else the training schedule in training mode, else the default."""
        if num_steps is not None:
            return self.config.block_steps(num_steps)
        if not self.training:
            return self.config.block_steps()
        if self.config.train_step_schedule == "random":
            choices = self.config.step_choices()
            index = torch.randint(len(choices), (1,), generator=self._step_generator()).item()
            return self.config.block_steps(choices[index])
        return self.config.block_steps(self.config.train_num_steps)

    def _step_generator(self) -> torch.Generator | None:
        if self.config.train_step_seed is None:
            return None
        if self._train_step_generator is None:
            self._train_step_generator = torch.Generator().manual_seed(self.config.train_step_seed)
        return self._train_step_generator

    def _start_generator(self) -> torch.Generator | None:
        # Its own stream, so switching the consistency term on leaves the drawn step counts as they were.
        if self.config.train_step_seed is None:
            return None
        if self._consistency_generator is None:
            self._consistency_generator = torch.Generator().manual_seed(self.config.train_step_seed + 1)
        return self._consistency_generator

    def _prepare_cache(self, past_key_values: Cache, block_steps: list[int]) -> None:
        """Check that the cache was filled with the same step layout, record it, and give it one slot per evaluation."""
        layout = (self.config.solver, tuple(block_steps))
        recorded = getattr(past_key_values, "ode_step_layout", None)
        if recorded is not None and recorded != layout and past_key_values.get_seq_length() > 0:
            raise ValueError(
                f"This KV cache was filled with num_steps={list(recorded[1])} (solver {recorded[0]!r}) but this call "
                f"uses num_steps={block_steps} (solver {layout[0]!r}): each solver step owns its own cache slots, so "
                "keep num_steps fixed for one cache (one generate call), or start a new cache."
            )
        past_key_values.ode_step_layout = layout
        needed = self.cache_slots(block_steps)
        if len(past_key_values.layers) < needed:
            if not isinstance(past_key_values, DynamicCache) or not all(
                isinstance(layer, DynamicLayer) for layer in past_key_values.layers
            ):
                raise ValueError(
                    f"num_steps={block_steps} needs {needed} KV-cache slots but the {type(past_key_values).__name__} has "
                    f"{len(past_key_values.layers)}; use a DynamicCache (the default of generate)."
                )
            past_key_values.layers.extend(DynamicLayer() for _ in range(needed - len(past_key_values.layers)))

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        num_steps: int | list[int] | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        compute_consistency: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> OdeSharedModelOutput:
        r"""
        num_steps (`int` or `list[int]`, *optional*):
            Solver steps for this call (a total over the shared blocks, or one value per block). Defaults to the
            steps a filled `past_key_values` was built with, else the training schedule in training mode, else
            `config.num_steps`.
        output_hidden_states (`bool`, *optional*):
            Return the residual stream entering every layer evaluation, plus the final normed state.
        cache (`Cache`, *optional*):
            The KV cache under the name transformers >= 5.24 uses (`past_key_values` is the same argument).
        compute_consistency (`bool`, *optional*, defaults to `False`):
            In training mode, also return the step-consistency term (`config.consistency_weight`,
            `config.consistency_samples`); the causal-LM head asks for it when it computes a loss.

        Raises:
            ValueError: for a bad `num_steps`, a cache filled with another step layout, or a consistency term
                asked for on a filled cache.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        past_key_values = merge_cache_arguments(past_key_values, cache)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if num_steps is None and past_key_values is not None and past_key_values.get_seq_length() > 0:
            # A filled cache fixes the layout: calls that do not name num_steps (e.g. a decoding strategy's own
            # forwards after generate's prefill) continue with the steps the cache was filled with.
            num_steps = getattr(past_key_values, "ode_step_layout", (None, None))[1]
            num_steps = list(num_steps) if num_steps is not None else None
        block_steps = self.resolve_num_steps(num_steps)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if (
            self.gradient_checkpointing
            and self.training
            and torch.is_grad_enabled()
            and (use_cache or past_key_values is not None)
        ):
            # The backward replay of a checkpointed layer would write its cache slot a second time; transformers'
            # GradientCheckpointingLayer drops the cache only under the argument name its release uses.
            logger.warning_once("Caching is incompatible with gradient checkpointing: use_cache=False, no KV cache.")
            use_cache, past_key_values = False, None
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if past_key_values is not None:
            self._prepare_cache(past_key_values, block_steps)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (
                torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            ).unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{cache_param_name(create_causal_mask): past_key_values},
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        all_hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        slots = itertools.count()

        consistency = compute_consistency and self.training and self.config.consistency_weight > 0
        if consistency and past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError(
                "The step-consistency term is computed on whole sequences; call without a filled KV cache."
            )

        def evaluate_uncached(
            layer: OdeSharedDecoderLayer, pending: PendingUpdate, condition: StepCondition | None = None
        ):
            # The extra steps of the consistency term: same positions and mask, no cache slot, not recorded.
            return layer(
                *pending,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                step_condition=condition,
                **kwargs,
            )

        def evaluate(
            layer: OdeSharedDecoderLayer, pending: PendingUpdate, condition: StepCondition | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            point, update = layer(
                *pending,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                cache_slot=next(slots),
                step_condition=condition,
                **kwargs,
            )
            if all_hidden_states is not None:
                all_hidden_states.append(point)
            return point, update

        pending: PendingUpdate = (inputs_embeds, None, 1.0)
        for layer in self.pre_layers:
            pending = (*evaluate(layer, pending), 1.0)
        consistency_terms = []
        for block, steps, interval in zip(self.shared_blocks, block_steps, self.config.block_intervals()):
            step_size = interval / steps
            starts = self._consistency_starts(steps) if consistency else set()
            trajectory = {}  # step index -> pending update at that step boundary, for the consistency term
            for k in range(steps):
                if k in starts or k - 2 in starts:
                    trajectory[k] = pending
                pending = self._solver_step(block, pending, k * step_size, step_size, interval, evaluate)
            trajectory[steps] = pending
            for k in sorted(starts):
                start = _materialise(trajectory[k]).detach()
                big_step = self._solver_step(
                    block, (start, None, 1.0), k * step_size, 2 * step_size, interval, evaluate_uncached
                )
                consistency_terms.append(
                    _relative_sq_error(_materialise(big_step), _materialise(trajectory[k + 2]).detach())
                )
        for layer in self.post_layers:
            pending = (*evaluate(layer, pending), 1.0)
        _, hidden_states = self.norm(*pending)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        consistency_loss = None
        if consistency:
            consistency_loss = _token_mean(
                consistency_terms, attention_mask, kwargs.get("num_items_in_batch"), inputs_embeds
            )
        return OdeSharedModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            consistency_loss=consistency_loss,
            **{cache_output_field(BaseModelOutputWithPast): past_key_values if use_cache else None},
        )

    def _consistency_starts(self, steps: int) -> set[int]:
        """Step indices `k` (with `k + 2 <= steps`) whose state starts a consistency pair in this batch."""
        if steps < 2:
            return set()
        order = torch.randperm(steps - 1, generator=self._start_generator())
        return set(order[: self.config.consistency_samples].tolist())

    def _solver_step(
        self,
        block: nn.ModuleList,
        pending: PendingUpdate,
        time: float,
        step_size: float,
        interval: float,
        evaluate: Callable,
    ) -> PendingUpdate:
        """One solver step of size `step_size` from depth `time` over `block`, as a pending update of its start point.

        Every evaluation passes its own depth and the step size to a step-aware block, normalised by the block's
        interval: Euler and the first evaluation of Heun / midpoint at `time`, Heun's second at `time + h`,
        midpoint's second at `time + h / 2`.
        """
        point, slope = _block_field(block, pending, evaluate, (time / interval, step_size / interval))
        if self.config.solver == "euler":
            return point, slope, step_size
        if self.config.solver == "heun":
            _, slope_end = _block_field(
                block, (point, slope, step_size), evaluate, ((time + step_size) / interval, step_size / interval)
            )
            return point, (slope + slope_end) * 0.5, step_size
        # midpoint
        _, slope_mid = _block_field(
            block,
            (point, slope, step_size * 0.5),
            evaluate,
            ((time + 0.5 * step_size) / interval, step_size / interval),
        )
        return point, slope_mid, step_size


def _block_field(
    block: nn.ModuleList, pending: PendingUpdate, evaluate: Callable, condition: StepCondition
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate `F(x) = B(x) - x` of a shared block at `x = base + step * update`; returns `(x, F(x))`.

    Inside the block its layers follow each other at unit step, so `F` is the sum of their residual updates; every
    layer reads the same `condition` (the evaluation's depth and step size).
    """
    start, field = None, None
    for layer in block:
        point, update = evaluate(layer, pending, condition)
        start = point if start is None else start
        field = update if field is None else field + update
        pending = (point, update, 1.0)
    return start, field


def _materialise(pending: PendingUpdate) -> torch.Tensor:
    """The state `base + step_size * update` a pending update stands for (the arithmetic of `OdeStepRMSNorm`)."""
    base, update, step_size = pending
    return base if update is None else base + step_size * update


def _relative_sq_error(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token squared error relative to the target's squared norm, `(batch, seq)`, computed in float32."""
    student, target = student.float(), target.float()
    return (student - target).pow(2).sum(-1) / (target.pow(2).sum(-1) + 1e-6)


def _token_mean(terms: list[torch.Tensor], attention_mask, num_items_in_batch, like: torch.Tensor) -> torch.Tensor:
    """Mean over consistency pairs of the per-token error, summed over real tokens and normalised like the LM loss.

    With `num_items_in_batch` (Trainer's count of label tokens over the accumulated batch) the sum is divided by it,
    as the LM loss is, so gradient accumulation weighs both terms alike; otherwise by the number of real tokens.
    """
    if not terms:  # every block took a single step this batch: nothing to compare
        return like.new_zeros((), dtype=torch.float32)
    per_token = torch.stack(terms).mean(0)
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    total = (per_token * mask).sum() if mask is not None else per_token.sum()
    if num_items_in_batch is not None:
        denominator = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    else:
        denominator = mask.sum() if mask is not None else per_token.numel()
    return total / denominator


class OdeSharedForCausalLM(EffiGenerationMixin, OdeSharedPreTrainedModel, GenerationMixin):
    """ODE-shared decoder with a language-modeling head; `num_steps` is a per-call argument of forward and generate.

    ```python
    >>> from hf_effitrain import OdeSharedConfig, OdeSharedForCausalLM
    >>> model = OdeSharedForCausalLM(OdeSharedConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_steps=4))
    >>> ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False, num_steps=2)
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: OdeSharedConfig):
        super().__init__(config)
        self.model = OdeSharedModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_steps: int | list[int] | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> OdeSharedCausalLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Labels for the language-modeling loss. In training mode with `config.consistency_weight > 0` the loss
            also carries the weighted step-consistency term (`lm_loss` and `consistency_loss` give both parts).
        num_steps (`int` or `list[int]`, *optional*):
            Solver steps for this call; see [`OdeSharedModel.forward`]. A cached generation must keep it fixed.
        cache (`Cache`, *optional*):
            The KV cache under the name transformers >= 5.24 uses (`past_key_values` is the same argument).
        """
        outputs: OdeSharedModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=merge_cache_arguments(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_steps=num_steps,
            compute_consistency=labels is not None,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = lm_loss = None
        if labels is not None:
            loss = lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
            if outputs.consistency_loss is not None:
                loss = lm_loss + self.config.consistency_weight * outputs.consistency_loss.to(lm_loss.dtype)
        return OdeSharedCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            lm_loss=lm_loss,
            consistency_loss=outputs.consistency_loss,
            **{cache_output_field(): output_cache(outputs)},
        )


# `save_pretrained` records the class in `auto_map`, so a checkpoint loads with `trust_remote_code=True`.
OdeSharedForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "OdeSharedCausalLMOutput",
    "OdeSharedForCausalLM",
    "OdeSharedModelOutput",
    "OdeStepConditioning",
    "OdeSharedModel",
    "OdeSharedPreTrainedModel",
    "OdeStepRMSNorm",
    "OdeSharedDecoderLayer",
    "OdeSharedAttention",
]
