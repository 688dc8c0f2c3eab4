"""The cascade-aware loss against an independent per-token computation, the presets and the weight errors."""

from __future__ import annotations

import math

import pytest
import torch

from hf_effitrain.methods.cascade.loss import (
    DEFAULT_PRESET,
    LOSS_PRESETS,
    CascadeLossWeights,
    cascade_aware_loss,
    resolve_loss_weights,
)
from tests.testing_utils import tiny_model

VOCAB = 11


def _batch(seed: int = 0):
    """Logits, labels (two ignored positions) and large predictions that hit every one of the four cases."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels[0, 2] = -100
    labels[1, 0] = -100
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)  # position t predicts label t+1
    small_pred = logits.argmax(-1)
    # make the small model right at positions 0-2 of row 0 and 0-1 of row 1 by moving the target there
    for b, t in [(0, 0), (0, 3), (1, 1), (1, 2)]:
        targets[b, t] = small_pred[b, t]
        labels[b, t + 1] = small_pred[b, t]
    large = torch.where(torch.rand(2, 6, generator=g) < 0.5, targets.clamp(min=0), (targets.clamp(min=0) + 1) % VOCAB)
    return logits, labels, targets, large


def _reference(logits, targets, large, weights: CascadeLossWeights, large_logits=None) -> torch.Tensor:
    """Loop over tokens: weight by case, add the temperature-scaled KL, divide by the trained-token count."""
    total, count = 0.0, 0
    w = {
        (True, True): weights.both_right,
        (True, False): weights.small_only,
        (False, True): weights.large_only,
        (False, False): weights.both_wrong,
    }
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            y = int(targets[b, t])
            if y == -100:
                continue
            count += 1
            row = logits[b, t].double()
            ce = -torch.log_softmax(row, -1)[y]
            case = (int(row.argmax()) == y, int(large[b, t]) == y)
            total += w[case] * ce
            if weights.kd_weight:
                T = weights.kd_temperature
                p = torch.softmax(large_logits[b, t].double() / T, -1)
                kl = (p * (torch.log(p) - torch.log_softmax(row / T, -1))).sum()
                total += weights.kd_weight * T * T * kl
    return total / count


CASE_MIXES = [
    CascadeLossWeights(),
    CascadeLossWeights(both_wrong=0.0),
    CascadeLossWeights(both_right=0.0, small_only=2.0, large_only=0.0, both_wrong=0.5),
    CascadeLossWeights(both_right=0.3, small_only=0.0, large_only=1.7, both_wrong=0.0),
    CascadeLossWeights(large_only=0.5, both_wrong=0.0, kd_weight=0.7, kd_temperature=2.0),
    CascadeLossWeights(kd_weight=1.0, kd_temperature=0.5),
]


def test_batch_hits_all_four_cases():
    logits, _, targets, large = _batch()
    valid = targets != -100
    small_right = (logits.argmax(-1) == targets)[valid]
    large_right = (large == targets)[valid]
    cases = {(bool(s), bool(l)) for s, l in zip(small_right, large_right)}
    assert cases == {(True, True), (True, False), (False, True), (False, False)}


@pytest.mark.parametrize(
    "weights", CASE_MIXES, ids=lambda w: ",".join(f"{x:g}" for x in (*w.case_weights, w.kd_weight))
)
def test_loss_equals_independent_computation(weights):
    logits, labels, targets, large = _batch()
    large_logits = torch.randn(2, 6, VOCAB, generator=torch.Generator().manual_seed(9))
    got = cascade_aware_loss(logits, labels, large, weights, large_logits=large_logits)
    expected = _reference(logits, targets, large, weights, large_logits)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # the Trainer's num_items_in_batch replaces the per-batch token count
    n = int((targets != -100).sum())
    scaled = cascade_aware_loss(logits, labels, large, weights, large_logits=large_logits, num_items_in_batch=2 * n)
    torch.testing.assert_close(scaled, got / 2)


def test_hidden_states_and_head_weight_equal_logits_path():
    g = torch.Generator().manual_seed(1)
    hidden, head = torch.randn(2, 6, 5, generator=g), torch.randn(VOCAB, 5, generator=g)
    _, labels, _, large = _batch()
    weights = LOSS_PRESETS["paper"]
    from_hidden = cascade_aware_loss(None, labels, large, weights, hidden_states=hidden, lm_head_weight=head)
    torch.testing.assert_close(from_hidden, cascade_aware_loss(hidden @ head.t(), labels, large, weights))


def test_standard_preset_is_exactly_the_stock_loss():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(input_ids=ids, labels=labels)
    assert torch.equal(cascade_aware_loss(out.logits, labels, None, LOSS_PRESETS["standard"]), out.loss)
    stock = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    assert torch.equal(
        cascade_aware_loss(out.logits, labels, None, LOSS_PRESETS["standard"], num_items_in_batch=torch.tensor(40)),
        stock,
    )


def test_presets_and_overrides():
    assert LOSS_PRESETS["paper"].case_weights == (1.0, 1.0, 1.0, 0.0)
    assert LOSS_PRESETS["standard"].is_standard and not LOSS_PRESETS["standard"].needs_large_predictions
    assert DEFAULT_PRESET in LOSS_PRESETS
    custom = resolve_loss_weights("paper", large_only=0.25, kd_weight=None)
    assert custom.case_weights == (1.0, 1.0, 0.25, 0.0) and custom.kd_weight == 0.0
    with pytest.raises(ValueError, match="preset"):
        resolve_loss_weights("cat9000")
    with pytest.raises(ValueError, match="setting"):
        resolve_loss_weights("paper", alpha=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"both_wrong": -0.1}, "both_wrong"),
        ({"kd_weight": -1.0}, "kd_weight"),
        ({"small_only": math.nan}, "small_only"),
        ({"both_right": 0.0, "small_only": 0.0, "large_only": 0.0, "both_wrong": 0.0}, "zero"),
        ({"kd_temperature": 0.0}, "kd_temperature"),
    ],
)
def test_invalid_weights_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CascadeLossWeights(**kwargs)


def test_missing_large_inputs_raise():
    logits, labels, _, large = _batch()
    with pytest.raises(ValueError, match="large_predictions"):
        cascade_aware_loss(logits, labels, None, LOSS_PRESETS["paper"])
    with pytest.raises(ValueError, match="large_logits"):
        cascade_aware_loss(logits, labels, large, LOSS_PRESETS["paper_kd"])
    with pytest.raises(ValueError, match="hidden_states"):
        cascade_aware_loss(None, labels, large, LOSS_PRESETS["paper"])
