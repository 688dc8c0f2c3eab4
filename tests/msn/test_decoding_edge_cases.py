"""Jacobi / TR-Jacobi edge cases: stop strings, score-reading criteria, `inputs_embeds`, text streaming, sliding
windows and stateful logits processors. Every output is compared with plain greedy `generate` (float32)."""

from __future__ import annotations

import functools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    SynthIDTextWatermarkingConfig,
    TextStreamer,
    WatermarkingConfig,
)

import hf_effitrain
from tests.testing_utils import ARCHITECTURES, tiny_model

STRATEGIES = ("jacobi", "tr_jacobi")


@functools.lru_cache(maxsize=None)
def _model(architecture: str):
    return tiny_model(architecture, attn_implementation="sdpa")


def _greedy(model, ids, **kwargs):
    return model.generate(ids, do_sample=False, pad_token_id=0, **kwargs)


def _strategy(model, ids, strategy, **kwargs):
    return hf_effitrain.generate(model, ids, strategy=strategy, pad_token_id=0, **kwargs)


def _tokenizer(words: list[str], metaspace: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' 128 ids (id 0 pads, id 1 is EOS)."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace() if metaspace else pre_tokenizers.Whitespace()
    if metaspace:
        backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


WORDS = ["<pad>", "</s>", "abcdef"] + [f"t{i}" for i in range(3, 128)]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_msn_stop_strings_exact(architecture):
    model, tokenizer = _model(architecture), _tokenizer(WORDS)
    torch.manual_seed(7)
    ids = torch.randint(2, 128, (1, 9))
    plain = _greedy(model, ids, max_new_tokens=30)[0, 9:].tolist()
    # a whole word, a suffix of a word, and a string spanning two tokens, completed at various depths of a block
    for k in (2, 9, 17):
        for stop in (" " + WORDS[plain[k]], WORDS[plain[k]][-1], WORDS[plain[k]] + " " + WORDS[plain[k + 1]][:2]):
            expected = _greedy(model, ids, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer)
            assert expected.shape[1] < 9 + 30
            for strategy in STRATEGIES:
                ours = _strategy(model, ids, strategy, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer)
                assert torch.equal(ours, expected), (strategy, stop)


def test_msn_stop_strings_from_generation_config_and_missing_tokenizer():
    model, tokenizer = tiny_model("llama", attn_implementation="sdpa"), _tokenizer(WORDS)
    ids = torch.tensor([[5, 9, 2, 77, 31, 8]])
    plain = _greedy(model, ids, max_new_tokens=20)[0, 6:].tolist()
    stop = WORDS[plain[6]]
    expected = _greedy(model, ids, max_new_tokens=20, stop_strings=stop, tokenizer=tokenizer)
    assert expected.shape[1] < 6 + 20
    config = GenerationConfig(max_new_tokens=20, do_sample=False, pad_token_id=0, stop_strings=[stop])
    model.generation_config.stop_strings = [stop]  # also from the model's own generation config
    for strategy in STRATEGIES:
        assert torch.equal(
            hf_effitrain.generate(model, ids, strategy=strategy, generation_config=config, tokenizer=tokenizer),
            expected,
        )
        assert torch.equal(_strategy(model, ids, strategy, max_new_tokens=20, tokenizer=tokenizer), expected)
        with pytest.raises(ValueError, match="stop strings.*tokenizer"):
            _strategy(model, ids, strategy, max_new_tokens=20)
    assert model.generation_config.stop_strings == [stop] and config.stop_strings == [stop]  # not modified


class _LowConfidenceStop(StoppingCriteria):
    """Stops when the latest score's maximum falls below `threshold` (reads `scores` like many user criteria)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([bool(scores) and float(scores[-1].max()) < self.threshold])


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_msn_stopping_criteria_see_each_tokens_scores(architecture):
    model = _model(architecture)
    torch.manual_seed(11)
    ids = torch.randint(0, 128, (1, 10))
    collect = dict(max_new_tokens=30, return_dict_in_generate=True, output_scores=True)
    maxima = sorted(float(score.max()) for score in _greedy(model, ids, **collect).scores)
    for threshold in maxima[5:12:3]:
        criteria = StoppingCriteriaList([_LowConfidenceStop(threshold)])
        expected = _greedy(model, ids, stopping_criteria=criteria, **collect)
        assert expected.sequences.shape[1] < 10 + 30
        for strategy in STRATEGIES:
            out = _strategy(model, ids, strategy, stopping_criteria=criteria, **collect)
            assert torch.equal(out.sequences, expected.sequences), (strategy, threshold)
            assert len(out.scores) == len(expected.scores)
        # without collected scores, greedy passes `scores=None` to the criteria: ours too
        plain = _greedy(model, ids, max_new_tokens=30, stopping_criteria=criteria)
        for strategy in STRATEGIES:
            assert torch.equal(_strategy(model, ids, strategy, max_new_tokens=30, stopping_criteria=criteria), plain)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_msn_inputs_embeds_prompt_exact(architecture):
    model = _model(architecture)
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, 10))
    embeds = model.get_input_embeddings()(ids).detach()
    left_padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    for extra in ({}, {"attention_mask": left_padded}):
        expected = model.generate(
            inputs_embeds=embeds,
            do_sample=False,
            pad_token_id=0,
            max_new_tokens=20,
            return_dict_in_generate=True,
            **extra,
        )
        for strategy in STRATEGIES:
            out = _strategy(
                model, None, strategy, inputs_embeds=embeds, max_new_tokens=20, return_dict_in_generate=True, **extra
            )
            assert torch.equal(out.sequences, expected.sequences), (strategy, extra)
            assert out.past_key_values.get_seq_length() == expected.past_key_values.get_seq_length()


def test_msn_text_streamer_text_equals_greedy():
    class Capture(TextStreamer):
        def __init__(self, tokenizer):
            super().__init__(tokenizer, skip_prompt=True)
            self.text = ""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.text += text

    # sentencepiece-style decoding: the text of a token depends on whether it starts the decoded span
    words = [f"▁w{i}" for i in range(128)]
    words[0], words[1], words[62] = "<pad>", "</s>", "\n"
    tokenizer = _tokenizer(words, metaspace=True)
    model = _model("llama")
    torch.manual_seed(299)
    ids = torch.randint(4, 128, (1, 8))
    greedy = Capture(tokenizer)
    _greedy(model, ids, max_new_tokens=40, streamer=greedy)
    assert "\n" in greedy.text
    for strategy in STRATEGIES:
        ours = Capture(tokenizer)
        _strategy(model, ids, strategy, max_new_tokens=40, streamer=ours)
        assert ours.text == greedy.text, strategy


@pytest.mark.parametrize(
    ("architecture", "extra"), [("mistral", {}), ("qwen2", {"use_sliding_window": True, "max_window_layers": 1})]
)
def test_msn_tr_jacobi_sliding_window_equal_to_max_length(architecture, extra):
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
    model = tiny_model(architecture, attn_implementation="sdpa", sliding_window=42, **extra)
    expected = _greedy(model, ids, max_new_tokens=30)  # max_length == sliding_window == 42
    for strategy in STRATEGIES:
        assert torch.equal(_strategy(model, ids, strategy, max_new_tokens=30), expected), strategy
    with pytest.raises(ValueError, match="sliding window of 42 tokens, shorter than max_length=43"):
        _strategy(model, ids, "tr_jacobi", max_new_tokens=31)
    embeds = model.get_input_embeddings()(ids).detach()  # a prompt given as embeddings counts in the window too
    expected = model.generate(inputs_embeds=embeds, do_sample=False, pad_token_id=0, max_new_tokens=30)
    assert torch.equal(_strategy(model, None, "tr_jacobi", inputs_embeds=embeds, max_new_tokens=30), expected)
    with pytest.raises(ValueError, match=r"max_length=31 \+ 12 `inputs_embeds` positions"):
        _strategy(model, None, "tr_jacobi", inputs_embeds=embeds, max_new_tokens=31)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"guidance_scale": 1.5}, "UnbatchedClassifierFreeGuidanceLogitsProcessor"),
        (
            {"watermarking_config": SynthIDTextWatermarkingConfig(keys=[1, 2, 3, 4], ngram_len=3)},
            "SynthIDTextWatermarkLogitsProcessor",
        ),
    ],
)
def test_msn_stateful_logits_processors_refused(kwargs, name):
    model = _model("llama")
    for strategy in STRATEGIES:
        with pytest.raises(ValueError, match=f"{name}.*keeps state.*strategy='plain'"):
            _strategy(model, torch.tensor([[1, 2, 3]]), strategy, max_new_tokens=5, **kwargs)


def test_msn_stateless_watermark_exact():
    model = _model("llama")
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (1, 10))
    for config in (
        WatermarkingConfig(bias=3.0),
        WatermarkingConfig(bias=3.0, seeding_scheme="selfhash", context_width=3),
    ):
        expected = _greedy(model, ids, max_new_tokens=24, watermarking_config=config)
        assert not torch.equal(expected, _greedy(model, ids, max_new_tokens=24))  # the watermark changes the text
        for strategy in STRATEGIES:
            assert torch.equal(_strategy(model, ids, strategy, max_new_tokens=24, watermarking_config=config), expected)


def test_a_passed_generation_config_keeps_the_checkpoint_strategy_parameters():
    from hf_effitrain.hub.generation_jacobi import _resolve_params

    model = tiny_model("llama")
    model.generation_config.tree_depth, model.generation_config.tree_top_k = 2, 3
    names = ("tree_depth", "tree_top_k")
    assert _resolve_params(model, GenerationConfig(max_new_tokens=5), {}, names) == {"tree_depth": 2, "tree_top_k": 3}
    assert _resolve_params(model, GenerationConfig(tree_depth=4), {"tree_top_k": 7}, names) == {
        "tree_depth": 4,
        "tree_top_k": 7,
    }
    ids = torch.tensor([[5, 9, 13, 2, 5, 9]])
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    out = hf_effitrain.generate(
        model, ids, strategy="tr_jacobi", generation_config=GenerationConfig(max_new_tokens=12, do_sample=False)
    )
    assert torch.equal(out, greedy)
