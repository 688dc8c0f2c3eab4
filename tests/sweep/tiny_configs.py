"""Tiny random configs for any causal-LM model type of the installed transformers (the architecture sweep's models).

`tiny_config(model_type)` builds the type's config class with every size it has under a common name shrunk
(`GENERIC_SIZES`), recursively for its sub-configs (text / vision / audio / encoder parts), so that the config's own
`__post_init__` derives the rest (layer-type lists, head dims) from the tiny sizes. `TYPE_TWEAKS` is the one table of
what individual architectures need beyond that, each with its reason. Only names the default config already has are
passed, so a size name of another family never leaks in; special-token ids outside the tiny vocabulary become 0/1/2.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

__all__ = ["GENERIC_SIZES", "SWEEP_VOCAB", "TYPE_TWEAKS", "tiny_causal_lm", "tiny_config"]

SWEEP_VOCAB = 128

# attribute name -> tiny value; families spell the same size differently (n_embd, d_model, ...).
GENERIC_SIZES: dict[str, Any] = {
    "vocab_size": SWEEP_VOCAB,
    "vocab_size_per_layer_input": SWEEP_VOCAB,
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "n_embed": 64,
    "emb_dim": 64,
    "embedding_dim": 64,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "num_layers": 2,
    "decoder_layers": 2,
    "encoder_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "n_kv_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "rotary_dim": 8,
    "intermediate_size": 128,
    "n_inner": 128,
    "ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128,
    "d_ff": 128,
    "ffn_hidden_size": 128,
    "intermediate_dim": 128,
    "attention_hidden_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    # multi-head latent attention (deepseek_v2/v3 family): rotary part of the head + the rest
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "max_seq_len": 256,
    "seq_length": 256,
    # state-space parts: n_heads * head_dim must equal expand * hidden (= 128)
    "state_size": 8,
    "d_state": 8,
    "mamba_d_state": 8,
    "ssm_state_size": 8,
    "mamba_n_heads": 8,
    "mamba_head_dim": 16,
    "mamba_expand": 2,
    "expand": 2,
    "mamba_d_conv": 4,
    "conv_kernel": 4,
    "time_step_rank": 8,
    "mamba_dt_rank": 8,
}
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}

# Per-type needs beyond GENERIC_SIZES (passed to the type's top-level config class), with the reason for each.
# Per-type needs beyond GENERIC_SIZES, with the reason for each. Keyed by model_type; an entry also applies where that
# type is the sub-config of a composite one (qwen3_5_text inside qwen3_5).
_MLA = {
    "head_dim": 8,
    "num_key_value_heads": 4,
}  # multi-head latent attention: rotary part = head_dim, kv heads = heads
TYPE_TWEAKS: dict[str, dict[str, Any]] = {
    # byte-group hash embeddings default to 500,002 rows per group
    "blt": {"encoder_hash_byte_group_vocab": 64, "encoder_hash_byte_group_size": [3, 4]},
    # the indexer's 12 heads must fit in the query heads of one key head (4 query heads over 2 key heads here)
    "kolibri1_1": {"index_num_heads": 2},
    **{
        t: dict(_MLA)
        for t in (
            "deepseek_v2",
            "deepseek_v3",
            "deepseek_v32",
            "glm4_moe_lite",
            "glm_moe_dsa",
            "youtu",
            "sarvam_mla",
            "axk1",
            "axk2",
            "minicpm3",
            "longcat_flash",
            "kimi_linear",
        )
    },
    # hybrids: the default layer patterns start with several linear / SSM / conv layers; keep one attention layer
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "bailing_hybrid": {"layer_group_size": 2, **_MLA},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "lfm3": {"layer_types": ["conv", "full_attention"]},
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"num_dense_layers": 1},
    # two hybrid layers (their shared transformer block is tied across them), attention width 2 * hidden
    "zamba": {
        "num_hidden_layers": 3,
        "layer_types": ["mamba", "hybrid", "hybrid"],
        "attention_hidden_size": 128,
        "head_dim": 32,
    },
    "xlstm": {"num_heads": 2, "chunk_size": 4, "qk_dim_factor": 1.0},  # mLSTM head and chunk sizes must divide evenly
    "zamba2": {"layer_types": ["mamba", "hybrid"]},
    **{
        t: {"layer_types": ["linear_attention", "full_attention"]}
        for t in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
    },
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "zaya": {"num_experts_per_tok": 1},  # the only routing it supports
    "dots3_note_text": {"num_key_value_heads": 4},  # requires kv heads = heads
    # BERT-style encoders are causal LMs only as decoders (their ForCausalLM warns without it)
    **{
        t: {"is_decoder": True}
        for t in (
            "bert",
            "bert-generation",
            "big_bird",
            "camembert",
            "data2vec-text",
            "electra",
            "ernie",
            "megatron-bert",
            "rembert",
            "roberta",
            "roberta-prelayernorm",
            "roc_bert",
            "roformer",
            "xlm-roberta",
            "xlm-roberta-xl",
            "xmod",
        )
    },
    "reformer": {
        "is_decoder": True,
        "axial_pos_shape": [16, 16],
        "axial_pos_embds_dim": [32, 32],
        "attn_layers": ["local", "lsh"],
    },
}


def _allowed(config: PretrainedConfig) -> set[str]:
    return set(config.__dict__) | set(getattr(config, "attribute_map", {}))


def _tiny_kwargs(config: PretrainedConfig, tweaks: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs of a tiny version of `config` (sub-configs as dicts of their own tiny kwargs)."""
    allowed = _allowed(config)
    kwargs = {name: value for name, value in GENERIC_SIZES.items() if name in allowed}
    vocab = kwargs.get("vocab_size", getattr(config, "vocab_size", SWEEP_VOCAB))
    for name, value in _TOKEN_IDS.items():
        current = config.__dict__.get(name)
        if (
            isinstance(current, int)
            and current >= vocab
            or isinstance(current, list)
            and any(i >= vocab for i in current)
        ):
            kwargs[name] = value
    # two layers of a two-kind pattern (sliding + full, linear + full, ...): one of each, in the default's order
    kinds = list(dict.fromkeys(config.__dict__.get("layer_types") or []))
    if len(kinds) == 2 and "layer_types" in allowed and kwargs.get("num_hidden_layers") == 2:
        kwargs["layer_types"] = kinds
    # multimodal placeholders (image / audio / video token ids) move to the top of the tiny vocabulary
    special = sorted(
        n
        for n, v in config.__dict__.items()
        if n.endswith(("token_id", "token_index")) and n not in _TOKEN_IDS and isinstance(v, int) and v >= vocab
    )
    kwargs.update({name: vocab - 1 - i for i, name in enumerate(special)})
    for name, child in config.__dict__.items():
        if isinstance(child, PretrainedConfig):  # text / vision / audio / encoder / decoder parts
            kwargs[name] = {
                "model_type": child.model_type,
                **_tiny_kwargs(child, TYPE_TWEAKS.get(child.model_type, {})),
            }
    kwargs.update(tweaks)
    return kwargs


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config of `model_type` (hidden 64, 2 layers, vocabulary of `SWEEP_VOCAB` ids)."""
    config_class = CONFIG_MAPPING[model_type]
    kwargs = _tiny_kwargs(config_class(), {**TYPE_TWEAKS.get(model_type, {}), **overrides})
    return config_class(**kwargs)


def tiny_causal_lm(model_type: str, seed: int = 0, **overrides: Any):
    """`AutoModelForCausalLM.from_config(tiny_config(model_type))` in float32 eval mode, eager attention."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="eager")
    return model.float().eval()
