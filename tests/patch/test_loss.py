"""`patch_level_loss` against an explicit-loop computation of the paper's formula, for every tested architecture."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification

from hf_effitrain import patch_level_loss
from hf_effitrain.methods.patch.loss import multi_target_cross_entropy
from hf_effitrain.models.presets import build_config
from tests.testing_utils import ARCHITECTURES, TINY_VOCAB, tiny_model


def reference_patch_loss(model, input_ids, K, attention_mask=None):
    """The formula written out with loops; the logits come from the model's own forward on `inputs_embeds`.

    Patch i = mean of the embeddings of its real tokens; all-padding patches are masked out of attention and do not
    predict; loss = (1/K) sum_k [mean over scored patches i of CE(logits_i, x_{(i+1)K+k})], padding never a target.
    """
    B, L = input_ids.shape
    T = L // K
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    table = model.get_input_embeddings().weight
    embeds = torch.zeros(B, T, table.shape[1])
    patch_mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for i in range(T):
            real = [table[input_ids[b, i * K + k]] for k in range(K) if mask[b, i * K + k]]
            if real:
                embeds[b, i] = torch.stack(real).sum(0) / len(real)
                patch_mask[b, i] = 1
    positions = torch.arange(T).expand(B, T)
    am = None if attention_mask is None else patch_mask
    logits = model(inputs_embeds=embeds, position_ids=positions, attention_mask=am).logits.float()
    per_k = []
    for k in range(K):
        terms = []
        for b in range(B):
            for i in range(T - 1):
                j = (i + 1) * K + k
                if patch_mask[b, i] and mask[b, j]:
                    terms.append(-F.log_softmax(logits[b, i], dim=-1)[input_ids[b, j]])
        per_k.append(torch.stack(terms).mean())
    return sum(per_k) / K


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("K", [2, 4])
def test_loss_matches_explicit_formula(arch, K):
    model = tiny_model(arch)
    ids = torch.randint(0, TINY_VOCAB, (2, 6 * K), generator=torch.Generator().manual_seed(K))
    torch.testing.assert_close(
        patch_level_loss(model, ids, K), reference_patch_loss(model, ids, K), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_with_padding_matches_explicit_formula(arch):
    K = 4
    model = tiny_model(arch)
    ids = torch.randint(0, TINY_VOCAB, (3, 6 * K), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 13:] = 0  # a partly padded patch (12..15) followed by all-padding patches
    mask[1, 20:] = 0  # the last patch is all padding
    torch.testing.assert_close(
        patch_level_loss(model, ids, K, mask), reference_patch_loss(model, ids, K, mask), rtol=1e-5, atol=1e-5
    )


def test_all_padding_patches_change_nothing():
    """Appending an all-padding patch leaves the loss unchanged: it is masked from attention and loss."""
    model = tiny_model("llama")
    ids = torch.randint(0, TINY_VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 16), torch.zeros(1, 4)], dim=1).long()
    torch.testing.assert_close(
        patch_level_loss(model, padded, 4, mask), patch_level_loss(model, ids, 4), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_patch_size_one_is_the_stock_causal_lm_loss(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[1, 9:] = -100
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    stock = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(patch_level_loss(model, ids, 1), stock, rtol=1e-6, atol=1e-6)
    stock_padded = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(patch_level_loss(model, ids, 1, mask, labels=labels), stock_padded, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_fused_loss", [False, True])
@pytest.mark.parametrize(
    "config_cls, model_cls, scaling",
    [
        ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}),
        ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.0625}),
    ],
)
def test_models_that_scale_their_logits_keep_the_stock_loss(config_cls, model_cls, scaling, use_fused_loss):
    """Granite divides the head's output by `logits_scaling`, Cohere multiplies it by `logit_scale`: the loss computed
    from the head's input must do the same (the fused path falls back to the logits path for such models)."""
    import transformers

    from hf_effitrain.integrations.lm_head import fused_causal_lm_loss

    config = getattr(transformers, config_cls)(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        **scaling,
    )
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # trained-looking logits, so that a missing scale shows clearly
        model.get_output_embeddings().weight.mul_(20)
    ids = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    stock = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(
        patch_level_loss(model, ids, 1, use_fused_loss=use_fused_loss), stock, rtol=1e-5, atol=1e-5
    )
    if use_fused_loss:
        assert (
            fused_causal_lm_loss(model, {"input_ids": ids, "labels": ids}) is None
        )  # the trainer then uses the stock loss


def test_gradients_reach_embeddings_and_head():
    model = tiny_model("gpt2").train()
    ids = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    patch_level_loss(model, ids, 4).backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_head_cross_entropy_matches_the_fused_op_oracle():
    """The (hidden, weight, targets) step has the contract of `hf_effitrain.ops.fused_linear_cross_entropy`."""
    ops = pytest.importorskip("hf_effitrain.ops.linear_cross_entropy")
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(10, 8, generator=g), torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (10, 4), generator=g)
    targets[3, 1] = targets[7, :] = -100
    torch.testing.assert_close(
        multi_target_cross_entropy(hidden, weight, targets), ops.linear_cross_entropy_naive(hidden, weight, targets)
    )


@pytest.mark.parametrize(
    "length, K, match",
    [(10, 4, "does not fit patch_size=4"), (4, 4, "at least 2 patches"), (8, 0, "patch_size must be >= 1")],
)
def test_bad_lengths_and_patch_sizes(length, K, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        patch_level_loss(model, torch.zeros(1, length, dtype=torch.long), K)


def test_non_integer_patch_size():
    with pytest.raises(TypeError, match="patch_size must be an int"):
        patch_level_loss(tiny_model("llama"), torch.zeros(1, 8, dtype=torch.long), 2.0)


def test_model_without_lm_head():
    base = AutoModel.from_config(build_config("tiny", "llama", vocab_size=TINY_VOCAB))
    with pytest.raises(ValueError, match="no LM head"):
        patch_level_loss(base, torch.zeros(1, 8, dtype=torch.long), 2)
    classifier = AutoModelForSequenceClassification.from_config(build_config("tiny", "llama", vocab_size=TINY_VOCAB))
    with pytest.raises(ValueError, match="no LM head"):
        patch_level_loss(classifier, torch.zeros(1, 8, dtype=torch.long), 2)


def test_model_without_input_embeddings():
    class NoEmbeddings(torch.nn.Module):
        def get_input_embeddings(self):
            raise NotImplementedError

    with pytest.raises(ValueError, match="no input embeddings"):
        patch_level_loss(NoEmbeddings(), torch.zeros(1, 8, dtype=torch.long), 2)


# Conventions that a loss computed outside the model's forward gets wrong unless it scores the model's own logits.
# Each type's K=1 patch loss must equal the next-token cross-entropy of its own logits on `input_ids`.
CONVENTION_TYPES = {
    "minicpm3": "hidden states divided by logits_scaling before the head (scaled once, not twice)",
    "gemma2": "final_logit_softcapping",
    "recurrent_gemma": "logits_soft_cap",
    "roberta": "position ids counted from padding_idx + 1",
    "mllama": "embedding table larger than the vocabulary",
}


@pytest.mark.parametrize("use_fused_loss", [False, True])
@pytest.mark.parametrize("model_type", sorted(CONVENTION_TYPES))
def test_patch_size_one_keeps_each_architecture_convention(model_type, use_fused_loss):
    from tests.sweep.tiny_configs import tiny_causal_lm

    model = tiny_causal_lm(model_type)
    with torch.no_grad():  # trained-looking logits, so that a missing scale or cap shows clearly
        model.get_output_embeddings().weight.mul_(20)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    stock = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(
        patch_level_loss(model, ids, 1, use_fused_loss=use_fused_loss), stock, rtol=1e-5, atol=1e-5
    )


def test_unknown_logit_settings_are_not_fused():
    """A config entry that looks like a logit transform the package does not know keeps the logits path."""
    from hf_effitrain.integrations.lm_head import fusable_lm_head

    model = tiny_model("llama")
    assert fusable_lm_head(model) is model.get_output_embeddings()
    model.config.output_logits_scaling_factor = 4.0
    assert fusable_lm_head(model) is None


@pytest.mark.parametrize(
    "model_type, overrides, match",
    [
        ("gemma4_text", {}, "per-layer inputs are looked up by token id"),
        ("deepseek_v4", {}, "routes hash-assigned experts by token id"),
        ("prophetnet", {}, "n-gram streams"),
        ("roberta", {"is_decoder": False}, "attend bidirectionally"),
    ],
)
def test_architectures_that_need_token_ids_are_refused(model_type, overrides, match):
    from tests.sweep.tiny_configs import tiny_causal_lm

    model = tiny_causal_lm(model_type, **overrides)
    with pytest.raises(ValueError, match=match):
        patch_level_loss(model, torch.randint(3, 100, (1, 8)), 2)
