"""Deferral curves: the end points are the members' own quality; areas, FLOPs, the plot and errors."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from hf_effitrain.hub.modeling_cascade import CascadeForCausalLM
from hf_effitrain.methods.cascade import (
    DeferralCurve,
    deferral_curve,
    forward_flops_per_token,
    plot_deferral_curves,
    summarize_curves,
)
from tests.cascade.cascade_helpers import EOS_ID, tiny_pair, word_tokenizer


def _rows(n: int = 6, length: int = 16) -> torch.LongTensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(0))


def _own_accuracy_and_loss(model, rows):
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=rows).logits[:, :-1].float(), -1)
    targets = rows[:, 1:]
    accuracy = (logprobs.argmax(-1) == targets).double().mean()
    loss = -logprobs.gather(-1, targets[..., None]).double().mean()
    return float(accuracy), float(loss)


def _sharpened_pair():
    """Scale the LM heads so that the members are confident and right on some tokens (accuracy above zero)."""
    small, large = tiny_pair("llama")
    with torch.no_grad():
        small.lm_head.weight.mul_(30.0)
        large.lm_head.weight.copy_(large.model.embed_tokens.weight.roll(1, 0) * 40.0)
    return small, large


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("metric", ["token_accuracy", "token_loss"])
def test_text_curve_end_points_are_member_quality(level, metric):
    small, large = _sharpened_pair()
    cascade = CascadeForCausalLM.from_models(small, large, rule="chow_quantile", quantile=0.25)
    rows = _rows()
    curve = deferral_curve(cascade, rows, metric=metric, level=level, num_points=6)
    index = 0 if metric == "token_accuracy" else 1
    small_q, large_q = _own_accuracy_and_loss(small, rows)[index], _own_accuracy_and_loss(large, rows)[index]
    assert curve.thresholds[0] == -math.inf and curve.thresholds[-1] == math.inf
    assert curve.deferral_ratio[0] == 0.0 and curve.deferral_ratio[-1] == 1.0
    assert curve.quality[0] == pytest.approx(small_q, abs=1e-12) and curve.small_quality == pytest.approx(
        small_q, abs=1e-12
    )
    assert curve.quality[-1] == pytest.approx(large_q, abs=1e-12) and curve.large_quality == pytest.approx(
        large_q, abs=1e-12
    )
    assert curve.deferral_ratio == sorted(curve.deferral_ratio)
    fs, fl = forward_flops_per_token(small), forward_flops_per_token(large)
    assert curve.relative_flops[0] == pytest.approx(fs / fl) and curve.relative_flops[-1] == pytest.approx(1 + fs / fl)


def test_curve_area_and_flops_saved():
    curve = DeferralCurve(
        metric="token_accuracy",
        level="token",
        rule="token_confidence",
        thresholds=[-math.inf, -1.0, math.inf],
        deferral_ratio=[0.0, 0.5, 1.0],
        relative_flops=[0.1, 0.6, 1.1],
        quality=[0.2, 0.6, 0.6],
        small_quality=0.2,
        large_quality=0.6,
        small_flops_per_token=2,
        large_flops_per_token=20,
        num_examples=1,
        num_tokens=4,
    )
    assert curve.area == pytest.approx(0.5 * (0.2 + 0.6) / 2 + 0.5 * 0.6)
    assert curve.flops_saved_at(0.01) == pytest.approx(0.4)
    summary = summarize_curves({"standard": curve, "cat": curve}, baseline="standard")
    assert summary["cat"]["area_gain_vs_standard"] == 0.0 and "area_gain_vs_standard" not in summary["standard"]


def _completion_data(small, n: int = 4) -> Dataset:
    """Prompts whose reference completion is the small model's own greedy continuation for even rows."""
    g = torch.Generator().manual_seed(3)
    prompts, completions = [], []
    for i in range(n):
        ids = torch.randint(3, 128, (1, 5), generator=g)
        out = small.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None)[0, 5:]
        ref = out if i % 2 == 0 else (out + 1).clamp(3, 127)
        prompts.append(" ".join(f"w{t}" for t in ids[0].tolist()))
        completions.append(" ".join(f"w{t}" for t in ref.tolist()))
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_exact_match_end_points(level):
    small, large = tiny_pair("llama")
    small.generation_config.eos_token_id = EOS_ID
    cascade = CascadeForCausalLM.from_models(small, large)
    data = _completion_data(small)
    curve = deferral_curve(
        cascade, data, metric="exact_match", level=level, tokenizer=word_tokenizer(), num_points=2, batch_size=3
    )
    assert curve.small_quality == 0.5  # the even rows by construction
    assert curve.quality[0] == curve.small_quality and curve.quality[-1] == curve.large_quality
    assert curve.deferral_ratio[0] == 0.0 and curve.deferral_ratio[-1] == 1.0


def test_plot_writes_png(tmp_path):
    small, large = tiny_pair("llama")
    cascade = CascadeForCausalLM.from_models(small, large)
    curve = deferral_curve(cascade, _rows(3, 8), num_points=3)
    path = plot_deferral_curves({"standard": curve, "cat": curve}, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors():
    small, large = tiny_pair("llama")
    cascade = CascadeForCausalLM.from_models(small, large)
    with pytest.raises(ValueError, match="metric"):
        deferral_curve(cascade, _rows(), metric="bleu")
    with pytest.raises(ValueError, match="CascadeForCausalLM"):
        deferral_curve(small, _rows())
    with pytest.raises(ValueError, match="tokenizer"):
        deferral_curve(cascade, _completion_data(small, 2), metric="exact_match")
    with pytest.raises(ValueError, match="prompt"):
        deferral_curve(cascade, Dataset.from_dict({"text": ["w3"]}), metric="exact_match", tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match="input_ids"):
        deferral_curve(cascade, Dataset.from_dict({"text": ["w3"]}))
    with pytest.raises(ValueError, match="share a metric"):
        a = deferral_curve(cascade, _rows(2, 6), num_points=2)
        b = deferral_curve(cascade, _rows(2, 6), metric="token_loss", num_points=2)
        plot_deferral_curves({"a": a, "b": b}, "unused.png")


def test_a_shared_cache_never_mixes_models_and_is_hit_by_equal_rows():
    small, large = _sharpened_pair()
    other_small, _ = tiny_pair("llama")
    rows = _rows()
    calls = {"large": 0}
    hook = large.register_forward_hook(lambda *args: calls.__setitem__("large", calls["large"] + 1))
    cache: dict = {}
    for member in (small, other_small):
        cascade = CascadeForCausalLM.from_models(member, large)
        cached = deferral_curve(
            cascade, rows.clone(), metric="token_accuracy", level="token", num_points=4, cache=cache
        )
        fresh = deferral_curve(cascade, rows, metric="token_accuracy", level="token", num_points=4)
        assert cached.quality == fresh.quality and cached.deferral_ratio == fresh.deferral_ratio
    hook.remove()
    assert calls["large"] == 1 + 2  # once through the shared cache (equal rows, another tensor), twice uncached
