"""A small -> large cascade of two causal LMs stored as one `PreTrainedModel` (one safetensors checkpoint).

`CascadeForCausalLM` holds two ordinary transformers causal LMs, `small` and `large`, built from the sub-configs of
[`CascadeConfig`] with `AutoModelForCausalLM.from_config`, so the members keep their stock architectures and
weight names (`small.model.layers.0...`, `large.transformer.h.0...`). Its `forward` is the small model's (the
cascade's first stage, which is also what plain `generate` decodes with); `generate(strategy="cascade")` runs the
deferral rule of the config, see `generation_cascade.py`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import logging

from .configuration_cascade import CascadeConfig, add_speculative_defaults, check_deferral_settings
from .generation_effi import EffiGenerationMixin
from .transformers_compat import merge_cache_arguments, model_cache_kwarg

logger = logging.get_logger(__name__)


def _vocab_size(model: nn.Module) -> int:
    """Rows of the output embedding: the vocabulary the model actually predicts over."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def check_cascade_members(small: nn.Module, large: nn.Module, small_tokenizer=None, large_tokenizer=None) -> None:
    """Check that `large` can back up `small` in a cascade or in cascade-aware training.

    Raises:
        ValueError: when the two models predict over different vocabularies, or when the given tokenizers differ
            (their vocabularies are compared token by token), since a token id would then mean different text.

    Logs a warning when `large` has fewer parameters than `small`: legal, but deferring to it rarely pays.
    """
    small_vocab, large_vocab = _vocab_size(small), _vocab_size(large)
    if small_vocab != large_vocab:
        raise ValueError(
            f"The small and large models must share one vocabulary, but the small model predicts {small_vocab} "
            f"tokens and the large one {large_vocab}. Train both with the same tokenizer."
        )
    if (
        small_tokenizer is not None
        and large_tokenizer is not None
        and small_tokenizer.get_vocab() != large_tokenizer.get_vocab()
    ):
        raise ValueError(
            "The small and large models' tokenizers differ (their vocabularies map tokens to different ids); use one tokenizer for both."
        )
    small_params = sum(p.numel() for p in small.parameters())
    large_params = sum(p.numel() for p in large.parameters())
    if large_params < small_params:
        logger.warning(
            f"The large model ({large_params:,} parameters) is smaller than the small one ({small_params:,}); "
            "a cascade usually defers to a bigger, stronger model."
        )


class CascadePreTrainedModel(PreTrainedModel):
    config_class = CascadeConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class CascadeForCausalLM(EffiGenerationMixin, CascadePreTrainedModel, GenerationMixin):
    """A cascade of a `small` and a `large` causal LM with a deferral rule.

    Build it from two trained models with [`CascadeForCausalLM.from_models`], save it with `save_pretrained` (both
    members in one safetensors file set plus this code), reload it with
    `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.

    `forward` runs the small model; `generate()` defaults to `strategy="cascade"` (the generation config's
    `strategy` entry), which takes `deferral`, `rule`, `threshold` and `quantile` overrides per call;
    `strategy="speculative_cascade"` drafts with the small model and verifies with the large one
    (`generation_speculative_cascade.py`; `speculative_rule`, `speculative_alpha`, `cascade_draft_len`).
    """

    def __init__(
        self, config: CascadeConfig, small: PreTrainedModel | None = None, large: PreTrainedModel | None = None
    ):
        super().__init__(config)
        self.small = small if small is not None else AutoModelForCausalLM.from_config(config.small)
        self.large = large if large is not None else AutoModelForCausalLM.from_config(config.large)
        check_cascade_members(self.small, self.large)
        self.post_init()
        self._mark_cascade_strategy()

    def _mark_cascade_strategy(self) -> None:
        # A config "from the model config" drops custom entries when reloaded; ours must keep `strategy`.
        self.generation_config.strategy = "cascade"
        self.generation_config._from_model_config = False
        add_speculative_defaults(self.generation_config)  # strategy="speculative_cascade" reads them

    @classmethod
    def from_models(
        cls,
        small: PreTrainedModel,
        large: PreTrainedModel,
        deferral: str = "sequence",
        rule: str = "chow_average",
        threshold: float = -1.0,
        quantile: float = 0.0,
    ) -> "CascadeForCausalLM":
        """Wrap two trained causal LMs (kept as they are: same modules, weights shared) into a cascade.

        The cascade's generation config starts as a copy of the small model's (EOS, pad, lengths), with
        `strategy="cascade"`. See [`CascadeConfig`] for the deferral arguments.

        Raises:
            ValueError: for a vocabulary mismatch or an invalid deferral setting.
        """
        check_deferral_settings(deferral, rule, float(threshold), float(quantile))
        config = CascadeConfig(
            small=copy.deepcopy(small.config),
            large=copy.deepcopy(large.config),
            deferral=deferral,
            rule=rule,
            threshold=float(threshold),
            quantile=float(quantile),
        )
        model = cls(config, small=small, large=large)
        model.generation_config = copy.deepcopy(small.generation_config)
        model._mark_cascade_strategy()
        return model.to(small.device)

    def get_input_embeddings(self) -> nn.Module:
        return self.small.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.small.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.small.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        **kwargs,
    ):
        """The small model's forward (logits, loss with `labels`, cache): the cascade's first stage."""
        return self.small(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{model_cache_kwarg(self.small): merge_cache_arguments(past_key_values, cache)},
            **kwargs,
        )


# `save_pretrained` records the class in `auto_map`, so a checkpoint loads with `trust_remote_code=True`.
CascadeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["CascadeForCausalLM", "CascadePreTrainedModel", "check_cascade_members"]
