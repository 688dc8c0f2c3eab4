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

Ships inside checkpoints: imports only torch, transformers and single-dot siblings.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.integrations import use_kernel_forward_from_hub
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRotaryEmbedding, apply_rotary_pos_emb, eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.output_capturing import capture_outputs

from .configuration_ode_shared import SOLVERS, OdeSharedConfig
from .generation_effi import EffiGenerationMixin

logger = logging.get_logger(__name__)

# A pending residual update: the next layer's input is `base + step_size * update` (`update=None`: input is `base`).
PendingUpdate = tuple[torch.Tensor, torch.Tensor | None, float]


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalise in float32, cast back, scale by `weight`."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


@use_kernel_forward_from_hub("EffiOdeStepRMSNorm")
class OdeStepRMSNorm(nn.Module):
    """x_new = x + step_size * update; returns (x_new, rms_norm(x_new) * weight).

    One module for the solver's residual update and the RMSNorm that reads it, so a kernel (issue 7,
    `EffiOdeStepRMSNorm`) can fuse both passes over the hidden states. This eager forward is the reference.
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

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
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


class OdeSharedDecoderLayer(GradientCheckpointingLayer):
    """A pre-norm Llama layer written as a vector field: it returns its residual update instead of adding it.

    Called with the pending update of the previous evaluation, it returns `(x, F(x))` where `x = base +
    step_size * update` is its input point and `F(x) = attn(norm(x)) + mlp(norm(x + attn(norm(x))))`.
    """

    def __init__(self, config: OdeSharedConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = OdeSharedAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = OdeStepRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = OdeStepRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        update: torch.Tensor | None = None,
        step_size: float = 1.0,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        cache_slot: int = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if update is None:
            normed = rms_norm(hidden_states, self.input_layernorm.weight, self.input_layernorm.variance_epsilon)
        else:
            hidden_states, normed = self.input_layernorm(hidden_states, update, step_size)
        attn_output, _ = self.self_attn(
            normed,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            cache_slot=cache_slot,
            **kwargs,
        )
        _, normed = self.post_attention_layernorm(hidden_states, attn_output, 1.0)
        return hidden_states, attn_output + self.mlp(normed)


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


class OdeSharedModel(OdeSharedPreTrainedModel):
    """The decoder stack: unshared pre layers, shared blocks integrated with the configured solver, post layers."""

    def __init__(self, config: OdeSharedConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.pre_layers = nn.ModuleList([OdeSharedDecoderLayer(config) for _ in range(config.num_pre_layers)])
        self.shared_blocks = nn.ModuleList(
            [nn.ModuleList([OdeSharedDecoderLayer(config) for _ in range(config.shared_block_layers)]) for _ in range(config.num_shared_blocks)]
        )
        self.post_layers = nn.ModuleList([OdeSharedDecoderLayer(config) for _ in range(config.num_post_layers)])
        self.norm = OdeStepRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self._train_step_generator: torch.Generator | None = None
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
            if not isinstance(past_key_values, DynamicCache) or not all(isinstance(layer, DynamicLayer) for layer in past_key_values.layers):
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
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        num_steps (`int` or `list[int]`, *optional*):
            Solver steps for this call (a total over the shared blocks, or one value per block). Defaults to the
            steps a filled `past_key_values` was built with, else the training schedule in training mode, else
            `config.num_steps`.
        output_hidden_states (`bool`, *optional*):
            Return the residual stream entering every layer evaluation, plus the final normed state.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
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
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if past_key_values is not None:
            self._prepare_cache(past_key_values, block_steps)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens).unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        all_hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        slots = itertools.count()

        def evaluate(layer: OdeSharedDecoderLayer, pending: PendingUpdate) -> tuple[torch.Tensor, torch.Tensor]:
            point, update = layer(
                *pending,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                cache_slot=next(slots),
                **kwargs,
            )
            if all_hidden_states is not None:
                all_hidden_states.append(point)
            return point, update

        pending: PendingUpdate = (inputs_embeds, None, 1.0)
        for layer in self.pre_layers:
            pending = (*evaluate(layer, pending), 1.0)
        for block, steps, interval in zip(self.shared_blocks, block_steps, self.config.block_intervals()):
            for _ in range(steps):
                pending = self._solver_step(block, pending, interval / steps, evaluate)
        for layer in self.post_layers:
            pending = (*evaluate(layer, pending), 1.0)
        _, hidden_states = self.norm(*pending)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )

    def _solver_step(self, block: nn.ModuleList, pending: PendingUpdate, step_size: float, evaluate: Callable) -> PendingUpdate:
        """One solver step of size `step_size` over `block`; returns the step as a pending update of its start point."""
        point, slope = _block_field(block, pending, evaluate)
        if self.config.solver == "euler":
            return point, slope, step_size
        if self.config.solver == "heun":
            _, slope_end = _block_field(block, (point, slope, step_size), evaluate)
            return point, (slope + slope_end) * 0.5, step_size
        # midpoint
        _, slope_mid = _block_field(block, (point, slope, step_size * 0.5), evaluate)
        return point, slope_mid, step_size


def _block_field(block: nn.ModuleList, pending: PendingUpdate, evaluate: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate `F(x) = B(x) - x` of a shared block at `x = base + step * update`; returns `(x, F(x))`.

    Inside the block its layers follow each other at unit step, so `F` is the sum of their residual updates.
    """
    start, field = None, None
    for layer in block:
        point, update = evaluate(layer, pending)
        start = point if start is None else start
        field = update if field is None else field + update
        pending = (point, update, 1.0)
    return start, field


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
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        num_steps (`int` or `list[int]`, *optional*):
            Solver steps for this call; see [`OdeSharedModel.forward`]. A cached generation must keep it fixed.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_steps=num_steps,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "OdeSharedForCausalLM",
    "OdeSharedModel",
    "OdeSharedPreTrainedModel",
    "OdeStepRMSNorm",
    "OdeSharedDecoderLayer",
    "OdeSharedAttention",
]
