"""`push_checkpoint` / `effitrain push`: the operations `HfApi.create_commit` receives, dry runs and refusals (no network)."""

from __future__ import annotations

import pytest
import yaml
from huggingface_hub import CommitInfo, HfApi

from hf_effitrain import export_pretrained, push_checkpoint
from hf_effitrain.cli.push import main as push_main
from hf_effitrain.export import CARD_REPO_PLACEHOLDER
from tests.testing_utils import tiny_model

CARD = {"method": "patch", "hyperparameters": {"patch_size": 4}, "results": {"validation_loss": 3.1}}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_pretrained(tiny_model("llama"), tmp_path_factory.mktemp("push") / "export", model_card=CARD)


@pytest.fixture
def hub_calls(monkeypatch):
    """Record what would reach the Hub; fail loudly on any other HfApi request."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        calls.append(("create_commit", repo_id, {"operations": list(operations), **kwargs}))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
            commit_message=kwargs.get("commit_message"),
            commit_description="",
            oid="abc",
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def uploaded_files(export_dir) -> set[str]:
    return {p.relative_to(export_dir).as_posix() for p in export_dir.rglob("*") if p.is_file()}


def test_push_commits_every_export_file_and_the_filled_card(export_dir, hub_calls):
    info = push_checkpoint(export_dir, "effi-org/tiny-llama", private=True, commit_message="first upload")
    assert info.oid == "abc"
    (repo_call, commit_call) = hub_calls
    assert repo_call == (
        "create_repo",
        "effi-org/tiny-llama",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert commit_call[0:2] == ("create_commit", "effi-org/tiny-llama")
    assert commit_call[2]["commit_message"] == "first upload"
    operations = {op.path_in_repo: op for op in commit_call[2]["operations"]}
    assert set(operations) == uploaded_files(export_dir)
    assert {
        "model.safetensors",
        "config.json",
        "modeling_effi.py",
        "generation_effi.py",
        "custom_generate/generate.py",
    } <= set(operations)
    assert operations["model.safetensors"].path_or_fileobj == str(export_dir / "model.safetensors")

    card = operations["README.md"].path_or_fileobj.decode("utf-8")
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers"
    assert {"hf_effitrain", "patch", "llama"} <= set(metadata["tags"])
    assert 'from_pretrained("effi-org/tiny-llama", trust_remote_code=True)' in card
    assert CARD_REPO_PLACEHOLDER not in card and CARD_REPO_PLACEHOLDER in (export_dir / "README.md").read_text()
    assert "| `patch_size` | 4 |" in card


def test_dry_run_prints_files_and_card_and_uploads_nothing(export_dir, hub_calls, capsys):
    assert push_checkpoint(export_dir, "effi-org/tiny-llama", dry_run=True) is None
    assert hub_calls == []
    out = capsys.readouterr().out
    for name in uploaded_files(export_dir):
        assert f"  {name}  (" in out
    assert "library_name: transformers" in out and 'from_pretrained("effi-org/tiny-llama"' in out


def test_cli_dry_run_and_upload(export_dir, hub_calls, capsys):
    assert push_main(["--checkpoint", str(export_dir), "--repo-id", "effi-org/x", "--dry-run"]) == 0
    assert hub_calls == [] and "Dry run: would upload" in capsys.readouterr().out
    assert push_main(["--checkpoint", str(export_dir), "--repo-id", "effi-org/x", "--private"]) == 0
    assert [call[0] for call in hub_calls] == ["create_repo", "create_commit"] and hub_calls[0][2]["private"] is True
    assert "Pushed" in capsys.readouterr().out


def test_cli_names_a_bad_checkpoint(tmp_path, hub_calls, capsys):
    with pytest.raises(SystemExit) as info:
        push_main(["--checkpoint", str(tmp_path), "--repo-id", "effi-org/x"])
    assert info.value.code == 2 and hub_calls == []
    assert "has no `*.safetensors` weights" in capsys.readouterr().err


def test_bad_folders_and_repo_ids_are_refused(export_dir, tmp_path, hub_calls):
    with pytest.raises(ValueError, match="Repo id must"):
        push_checkpoint(export_dir, "not a/valid/repo id")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="has no config.json"):
        push_checkpoint(tmp_path, "effi-org/x")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds pickled files \['optimizer.pt'\]"):
        push_checkpoint(tmp_path, "effi-org/x")
    assert hub_calls == []
