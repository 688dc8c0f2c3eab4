"""`effitrain push-kernels`: dry run lists the kernel repos and their files, the upload calls the Hub API as a
`kernel` repo on main and v<version>, bad arguments and stale builds are refused."""

import shutil
from pathlib import Path

import pytest

from hf_effitrain.cli import main as effitrain
from hf_effitrain.cli.push_kernels import PushKernelsArguments, push_kernel_repo, upload_plan
from hf_effitrain.ops import local_kernel_repo


def test_dry_run_lists_every_kernel_repo(capsys):
    assert effitrain(["push-kernels", "--repo-id", "my-org", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "my-org/effi-linear-cross-entropy (type kernel; branches main, v1)" in out
    assert "my-org/effi-ode-step" in out
    assert "build/torch-cuda/metadata.json" in out and "README.md" in out


class _RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs["repo_type"]))

    def create_branch(self, repo_id, branch, **kwargs):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, revision, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, revision, files))


def test_push_uploads_a_kernel_repo_to_main_and_version_branch():
    (entry,) = upload_plan(PushKernelsArguments(repo_id="me/lce", kernel="effi_linear_cross_entropy"))
    api = _RecordingApi()
    push_kernel_repo(entry, api=api)
    assert api.calls[0] == ("create_repo", "me/lce", "kernel")
    assert ("create_branch", "me/lce", "v1") in api.calls
    uploads = [call for call in api.calls if call[0] == "upload_folder"]
    assert [call[2] for call in uploads] == ["main", "v1"]
    assert "README.md" in uploads[0][3] and "build/torch-cuda/op.py" in uploads[0][3]
    assert not any("__pycache__" in name for name in uploads[0][3])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repo-id", "a/b"], "also give --kernel"),
        (["--repo-id", "a/b/c", "--kernel", "effi_ode_step"], "namespace/name"),
        (["--repo-id", "a", "--kernel", "effi_nothing"], "--kernel must be one of"),
    ],
)
def test_bad_arguments_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        effitrain(["push-kernels", *argv, "--dry-run"])


def test_stale_build_is_refused(tmp_path):
    shutil.copytree(local_kernel_repo("effi_ode_step"), tmp_path / "effi_ode_step")
    (tmp_path / "effi_ode_step" / "torch-ext" / "effi_ode_step" / "op.py").write_text("# edited\n")
    with pytest.raises(ValueError, match="out of date"):
        upload_plan(PushKernelsArguments(repo_id="me", kernels_dir=str(tmp_path)))
