"""`export_pretrained`: round trips through remote code in a process without hf_effitrain, for stock architectures,
re-exports and custom (`register_for_auto_class`) models, plus the card and the error paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedTokenizerFast,
)
from transformers.dynamic_module_utils import get_relative_import_files

from hf_effitrain import export_pretrained
from hf_effitrain.export import MODEL_CARD_KEYS, model_card_template_path, require_safetensors
from hf_effitrain.hub.generation_effi import STRATEGIES
from hf_effitrain.hub.generation_jacobi import STRATEGY_DEFAULTS
from tests.testing_utils import (
    ARCHITECTURES,
    TINY_VOCAB,
    repo_root,
    run_script_without_package,
    tiny_model,
)

PROMPT = [[1, 5, 7, 9, 11, 3]]
NEW_TOKENS = 6
CARD = {
    "method": "msn",
    "hyperparameters": {"learning_rate": 3e-4, "noise_length": 5},
    "data": "Python standard library source, stdlib scope",
    "results": {"validation_loss": 2.75},
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, TINY_VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


HUB = repo_root() / "hf_effitrain" / "hub"


def generation_closure() -> list[Path]:
    """`hub/generation_effi.py` and every hub file it reaches through `from .x import y`, transitively."""
    return [HUB / "generation_effi.py", *map(Path, get_relative_import_files(HUB / "generation_effi.py"))]


def save_expected(model, path) -> None:
    """Reference logits and greedy ids of the in-memory model, for the package-free child to compare against."""
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        logits = model(ids).logits
    greedy = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    save_file({"ids": ids, "logits": logits.contiguous(), "greedy": greedy}, str(path))


EXPORT_CHECKS = Path(__file__).resolve().parent / "export_checks.py"


def run_child(*jobs: dict) -> list[dict]:
    """Check each export in ONE package-free process (jobs: export_dir, expected_file, stock, tokenizer)."""
    jobs = [{key: str(value) if isinstance(value, Path) else value for key, value in job.items()} for job in jobs]
    cwd = Path(jobs[0]["export_dir"]).parent
    (cwd / "export_jobs.json").write_text(json.dumps({"new_tokens": NEW_TOKENS, "jobs": jobs}))
    proc = run_script_without_package(EXPORT_CHECKS, "export_jobs.json", cwd=cwd)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


def assert_strategy_plumbing(report: dict, prefix: str) -> None:
    assert report[f"{prefix}_probe_equal"]
    assert report[f"{prefix}_probe_calls"] == [["do_sample", "max_new_tokens", "pad_token_id"]]
    message = report[f"{prefix}_unknown_error"]
    assert "no_such_strategy" in message
    for name in STRATEGIES:
        assert repr(name) in message


@pytest.fixture(scope="module")
def stock_round_trips(tmp_path_factory):
    """Export a tiny model of every architecture and check all of them in ONE package-free process (saves startups)."""
    root = tmp_path_factory.mktemp("stock")
    exports, jobs = {}, []
    for architecture in ARCHITECTURES:
        model = tiny_model(architecture)
        model.generation_config.effi_test_draft_len = 4  # a strategy parameter must survive the export
        export_dir = export_pretrained(model, root / architecture, tokenizer=tiny_tokenizer(), model_card=CARD)
        save_expected(model, root / f"{architecture}.safetensors")
        exports[architecture] = (type(model).__name__, export_dir)
        jobs.append(
            dict(export_dir=export_dir, expected_file=root / f"{architecture}.safetensors", stock=True, tokenizer=True)
        )
    reports = run_child(*jobs)
    return {architecture: (*exports[architecture], report) for architecture, report in zip(ARCHITECTURES, reports)}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_stock_architecture_round_trip_without_the_package(architecture, stock_round_trips):
    stock_name, export_dir, report = stock_round_trips[architecture]
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == architecture
    assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_effi.Effi{stock_name}"}
    assert not list(export_dir.glob("*.bin"))
    saved_generation = json.loads((export_dir / "generation_config.json").read_text())
    assert {name: saved_generation.get(name) for name in STRATEGY_DEFAULTS} == STRATEGY_DEFAULTS

    assert report["remote_class"] == f"Effi{stock_name}"
    assert report["remote_mro"][1:3] == ["EffiGenerationMixin", stock_name]
    assert report["stock_class"] == stock_name
    assert report["draft_len"] == 4
    equal_keys = ("logits", "greedy", "tr_jacobi")
    for key in [f"remote_{k}_equal" for k in equal_keys] + [
        "stock_logits_equal",
        "stock_greedy_equal",
        "custom_none_equal",
        "custom_tr_jacobi_equal",
    ]:
        assert report[key], key
    assert_strategy_plumbing(report, "remote")
    assert_strategy_plumbing(report, "custom")
    assert report["fast_tokenizer_ids"] == [5, 7, 9]
    # transformers 5 picks qwen2's own tokenizer class whatever tokenizer_config.json says: the card must say so
    card_text = (export_dir / "README.md").read_text()
    card_uses_auto = "tokenizer = AutoTokenizer.from_pretrained(" in card_text
    if architecture in ("llama", "mistral", "qwen2"):  # gpt2's substitute class depends on the vocabulary
        assert card_uses_auto == (architecture != "qwen2")
    if card_uses_auto:
        assert report["auto_tokenizer_ids"] == [5, 7, 9]
    else:
        assert "tokenizer = PreTrainedTokenizerFast.from_pretrained(" in card_text


def test_reexport_of_a_reloaded_export_is_not_wrapped_twice(tmp_path):
    model = tiny_model("qwen2")
    first = export_pretrained(model, tmp_path / "first")
    reloaded = AutoModelForCausalLM.from_pretrained(first, trust_remote_code=True)
    assert type(reloaded).__name__ == "EffiQwen2ForCausalLM"
    second = export_pretrained(reloaded, tmp_path / "second")
    assert (second / "modeling_effi.py").read_text() == (first / "modeling_effi.py").read_text()
    assert json.loads((second / "config.json").read_text())["auto_map"] == {
        "AutoModelForCausalLM": "modeling_effi.EffiQwen2ForCausalLM"
    }
    again = AutoModelForCausalLM.from_pretrained(second, trust_remote_code=True)
    assert [c.__name__ for c in type(again).__mro__].count("EffiGenerationMixin") == 1
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


TOY_CONFIG = """
from transformers import PreTrainedConfig


class ToyConfig(PreTrainedConfig):
    model_type = "effi_export_toy"

    def __init__(self, vocab_size=128, hidden_size=16, num_hidden_layers=1, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)
"""

TOY_MODEL = '''
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_toy import ToyConfig
from .generation_effi import EffiGenerationMixin


class ToyForCausalLM(EffiGenerationMixin, PreTrainedModel, GenerationMixin):
    """Bag-of-previous-token LM: enough to have weights, logits and a generate()."""

    config_class = ToyConfig
    base_model_prefix = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return CausalLMOutputWithPast(logits=self.lm_head(self.embed(input_ids)))

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}
'''


@pytest.fixture
def toy_model(tmp_path, monkeypatch):
    """A custom model whose code lives in a hub-like package folder and is registered for remote code."""
    package = tmp_path / "toy_hub"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "configuration_toy.py").write_text(TOY_CONFIG)
    (package / "modeling_toy.py").write_text(TOY_MODEL)
    for source in generation_closure():
        shutil.copyfile(source, package / source.name)
    monkeypatch.syspath_prepend(str(tmp_path))
    from toy_hub.configuration_toy import ToyConfig
    from toy_hub.modeling_toy import ToyForCausalLM

    ToyConfig.register_for_auto_class()
    ToyForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    torch.manual_seed(0)
    return ToyForCausalLM(ToyConfig()).eval()


def test_custom_registered_models_round_trip_without_the_package(toy_model, tmp_path):
    """A custom class registered for remote code (a toy one in a hub-like folder, and the package's ode_shared)."""
    ode = tiny_model("ode_shared")
    jobs = []
    for name, model in (("toy", toy_model), ("ode", ode)):
        export_pretrained(model, tmp_path / name)
        save_expected(model, tmp_path / f"{name}.safetensors")
        jobs.append(
            dict(
                export_dir=tmp_path / name, expected_file=tmp_path / f"{name}.safetensors", stock=False, tokenizer=False
            )
        )
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_toy.ToyConfig",
        "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM",
    }
    ode_config = json.loads((tmp_path / "ode" / "config.json").read_text())
    assert ode_config["auto_map"]["AutoModelForCausalLM"] == "modeling_ode_shared.OdeSharedForCausalLM"
    # save_pretrained's custom_object_save follows `from .x import y` transitively: modeling -> generation_effi -> ...
    closure = {p.name for p in generation_closure()}
    assert {"modeling_toy.py", "configuration_toy.py"} | closure <= {p.name for p in (tmp_path / "toy").glob("*.py")}
    assert {"modeling_ode_shared.py", "configuration_ode_shared.py"} | closure <= {
        p.name for p in (tmp_path / "ode").glob("*.py")
    }
    assert not (tmp_path / "toy" / "modeling_effi.py").exists()
    toy_report, ode_report = run_child(*jobs)
    assert toy_report["remote_class"] == "ToyForCausalLM" and ode_report["remote_class"] == "OdeSharedForCausalLM"
    for report in (toy_report, ode_report):
        assert report["remote_logits_equal"] and report["remote_greedy_equal"]
        assert_strategy_plumbing(report, "remote")


def test_custom_model_registered_for_another_auto_class_is_refused(toy_model, tmp_path, monkeypatch):
    monkeypatch.setattr(type(toy_model), "_auto_class", "AutoModel")
    with pytest.raises(
        ValueError,
        match=r"its `_auto_class` is 'AutoModel'\): call `register_for_auto_class\('AutoModelForCausalLM'\)`",
    ):
        export_pretrained(toy_model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_custom_generate_folder_ships_the_entry_and_its_siblings(tmp_path):
    export_dir = export_pretrained(tiny_model("llama"), tmp_path / "export")
    folder = export_dir / "custom_generate"
    assert (folder / "generate.py").read_text() == (HUB / "custom_generate_entry.py").read_text()
    for source in generation_closure():
        assert (folder / source.name).read_text() == source.read_text()
    # a sibling reached along several import paths is listed once per path by get_relative_import_files
    assert sorted(p.name for p in folder.iterdir()) == sorted({"generate.py", *(p.name for p in generation_closure())})


def test_model_card_is_filled_from_the_template(tmp_path):
    details = {**CARD, "method": "MSN (noise_length=5, ahead)"}
    export_dir = export_pretrained(tiny_model("mistral"), tmp_path / "export", model_card=details)
    card = ModelCard.load(export_dir / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert set(card.data.tags) == {"hf_effitrain", "custom_code", "mistral", "msn"}
    assert "**Method:** MSN (noise_length=5, ahead)" in card.text
    text = card.text
    assert "trust_remote_code=True" in text and 'strategy="tr_jacobi"' in text
    assert "custom_generate=" in text and "MistralForCausalLM" in text
    assert "| `noise_length` | 5 |" in text and "| validation_loss | 2.75 |" in text
    assert CARD["data"] in text


def test_model_card_without_details_says_so(tmp_path):
    card = ModelCard.load(export_pretrained(tiny_model("gpt2"), tmp_path / "export") / "README.md")
    assert "No training details were recorded" in card.text and "No measured results were recorded" in card.text


def test_packaged_card_template_is_the_canonical_one():
    """The wheel ships `hf_effitrain/model_cards/`; the canonical, user-facing copy is the top-level `model_cards/`."""
    canonical = repo_root() / "model_cards" / model_card_template_path().name
    assert model_card_template_path().read_text() == canonical.read_text()


def test_non_empty_directory_needs_overwrite(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"exists and is not empty; pass `overwrite=True`"):
        export_pretrained(tiny_model("llama"), target)
    (target / "custom_generate").mkdir()
    (target / "custom_generate" / "stale_strategy.py").write_text("")
    export_pretrained(tiny_model("llama"), target, overwrite=True)
    assert (target / "model.safetensors").exists() and (target / "notes.txt").exists()
    assert not (target / "custom_generate" / "stale_strategy.py").exists()


def test_overwrite_removes_an_earlier_checkpoint_of_another_kind(tmp_path):
    target = tmp_path / "export"
    export_pretrained(tiny_model("llama"), target, tokenizer=tiny_tokenizer())
    tiny_model("qwen2").save_pretrained(target, max_shard_size="20KB")  # leaves a shard index and shards
    (target / "notes.txt").write_text("keep me")
    export_pretrained(tiny_model("gpt2"), target, overwrite=True)  # no tokenizer this time
    names = {p.name for p in target.iterdir()}
    assert "notes.txt" in names and "model.safetensors" in names
    assert not {n for n in names if n.startswith("tokenizer") or n.endswith(".index.json") or "-of-" in n}
    assert json.loads((target / "config.json").read_text())["model_type"] == "gpt2"


def test_model_card_lists_the_strategies_that_apply_and_the_default(tmp_path):
    from hf_effitrain import CascadeForCausalLM

    plain = ModelCard.load(export_pretrained(tiny_model("llama"), tmp_path / "plain") / "README.md").text
    assert "`jacobi`, `tr_jacobi`" in plain and "`cascade`" not in plain
    assert "`strategy=None` (the default) is the plain `generate`" in plain
    assert 'inputs = {"input_ids": torch.tensor(' in plain  # no tokenizer exported: the snippet brings token ids
    model = tiny_model("llama")
    model.generation_config.strategy = "jacobi"
    named = ModelCard.load(export_pretrained(model, tmp_path / "named", tokenizer=tiny_tokenizer()) / "README.md").text
    assert "uses this checkpoint's default strategy, `jacobi`" in named and 'strategy="plain"' in named
    assert "tokenizer.decode(output[0])" in named
    cascade = CascadeForCausalLM.from_models(tiny_model("llama"), tiny_model("qwen2"))
    card = ModelCard.load(export_pretrained(cascade, tmp_path / "cascade") / "README.md").text
    applying = card.split("## Training")[0].split("apply to this")[1].split(";")[0]
    assert "`cascade`" in applying and "`tr_jacobi`" not in applying and "`jacobi`" not in applying


def test_bad_models_are_refused(tmp_path):
    with pytest.raises(TypeError, match="expects a transformers `PreTrainedModel`, got Linear"):
        export_pretrained(torch.nn.Linear(2, 2), tmp_path / "a")
    backbone = LlamaModel(tiny_model("llama").config)
    with pytest.raises(ValueError, match="LlamaModel has no language-modeling head"):
        export_pretrained(backbone, tmp_path / "b")
    masked = BertForMaskedLM(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ValueError, match="BertForMaskedLM is not a causal LM of transformers"):
        export_pretrained(masked, tmp_path / "c")

    class UnregisteredLlama(LlamaForCausalLM):
        pass

    with pytest.raises(
        ValueError, match=r"UnregisteredLlama is neither a transformers causal LM nor registered for remote code"
    ):
        export_pretrained(UnregisteredLlama(tiny_model("llama").config), tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_bad_model_card_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown `model_card` keys \['author'\]; allowed keys are") as info:
        export_pretrained(tiny_model("llama"), tmp_path / "a", model_card={"method": "msn", "author": "me"})
    for key in MODEL_CARD_KEYS:
        assert key in str(info.value)
    with pytest.raises(TypeError, match=r"`model_card\['results'\]` must be a dict, got float"):
        export_pretrained(tiny_model("llama"), tmp_path / "b", model_card={"results": 2.5})


def test_require_safetensors(tmp_path):
    with pytest.raises(ValueError, match="does not exist or is not a directory"):
        require_safetensors(tmp_path / "missing")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"has no `\*\.safetensors` weights\. It holds pickled weights \(pytorch_model\.bin\)"
    ):
        require_safetensors(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert require_safetensors(tmp_path) == tmp_path


def test_custom_generate_entry_called_directly():
    """The entry also works as a plain function `generate(model, ids, ...)`, in-process, on a stock model."""
    from hf_effitrain.hub.custom_generate_entry import generate as entry

    model, ids = tiny_model("llama"), torch.tensor(PROMPT)
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(entry(model, ids, max_new_tokens=4, do_sample=False, streamer=None), expected)
    assert torch.equal(entry(ids, model=model, max_new_tokens=4, do_sample=False), expected)
    with pytest.raises(ValueError, match="Unknown decoding strategy 'nope'; valid strategies are"):
        entry(model, ids, strategy="nope")
    with pytest.raises(TypeError, match="needs the model"):
        entry()


def tiny_gpt_neox():
    """GPT-NeoX: transformers loads its checkpoints through a class-specific conversion mapping (`embed_out` ->
    `lm_head`), which a remote-code subclass loses unless the export keeps the stock loading behaviour."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return GPTNeoXForCausalLM(config).eval()


def test_export_keeps_the_stock_weight_loading_of_the_remote_class(tmp_path):
    model = tiny_gpt_neox()
    export_dir = export_pretrained(model, tmp_path / "neox")  # checks the reload itself (check_reload=True)
    assert "@keep_stock_weight_loading(GPTNeoXForCausalLM)" in (export_dir / "modeling_effi.py").read_text()
    assert (export_dir / "transformers_compat.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
    assert type(reloaded).__name__ == "EffiGPTNeoXForCausalLM"
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_export_that_would_reload_different_weights_is_refused(tmp_path, monkeypatch):
    """Without the stock loading behaviour GPT-NeoX's head would reload random: the export must say so, not ship."""
    from transformers import conversion_mapping

    from hf_effitrain import export as export_module

    source = export_module._EFFI_MODELING_SOURCE.replace("@keep_stock_weight_loading({base})", "")
    monkeypatch.setattr(export_module, "_EFFI_MODELING_SOURCE", source)
    # forget a mapping an earlier export registered for the class name in this process
    conversion_mapping.get_checkpoint_conversion_mapping("GPTNeoXForCausalLM")  # builds the cache
    monkeypatch.delitem(
        conversion_mapping._checkpoint_conversion_mapping_cache, "EffiGPTNeoXForCausalLM", raising=False
    )
    monkeypatch.setattr(
        conversion_mapping,
        "USER_REGISTERED_MAPPINGS",
        conversion_mapping.USER_REGISTERED_MAPPINGS - {"EffiGPTNeoXForCausalLM"},
    )
    with pytest.raises(
        export_module.ExportReloadError, match=r"EffiGPTNeoXForCausalLM .*lm_head\.weight: differs after reload"
    ):
        export_pretrained(tiny_gpt_neox(), tmp_path / "neox")
    export_pretrained(tiny_gpt_neox(), tmp_path / "unchecked", check_reload=False)  # the check can be skipped
