"""`scripts/push_kernels.py`: it runs from anywhere, its dry run lists the kernel repos and their files, the upload
calls the Hub API as a `kernel` repo on main and v<version>, bad arguments and stale builds are refused."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_effitrain.ops import local_kernel_repo
from tests.kernels.kernels_helpers import SCRIPTS_DIR, import_script

push_kernels = import_script("push_kernels")


def test_dry_run_lists_every_kernel_repo(tmp_path):
    # run as a user runs the script, from another folder: it finds its sibling module and the checkout's kernels/
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS_DIR / "push_kernels.py"), "--repo-id", "my-org", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "my-org/effi-linear-cross-entropy (type kernel; branches main, v1)" in proc.stdout
    assert "my-org/effi-ode-step" in proc.stdout
    assert "build/torch-cuda/metadata.json" in proc.stdout and "README.md" in proc.stdout


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
    args = push_kernels.PushKernelsArguments(repo_id="me/lce", kernel="effi_linear_cross_entropy")
    (entry,) = push_kernels.upload_plan(args)
    api = _RecordingApi()
    push_kernels.push_kernel_repo(entry, api=api)
    assert api.calls[0] == ("create_repo", "me/lce", "kernel")
    assert ("create_branch", "me/lce", "v1") in api.calls
    uploads = [call for call in api.calls if call[0] == "upload_folder"]
    assert [call[2] for call in uploads] == ["main", "v1"]
    assert "README.md" in uploads[0][3] and "build/torch-cuda/op.py" in uploads[0][3]
    assert not any("__pycache__" in name for name in uploads[0][3])


def _error_line(capsys) -> str:
    """The last stderr line, checked to be argparse's one error line (after the usage)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("push_kernels.py: error: "), err
    return line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repo-id", "a/b"], "also give --kernel"),
        (["--repo-id", "a/b/c", "--kernel", "effi_ode_step"], "namespace/name"),
        (["--repo-id", "a", "--kernel", "effi_nothing"], "--kernel must be one of"),
        (["--repo_id", "me", "--kernels_dir", "missing"], "no kernel repo"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        push_kernels.main([*argv, "--dry-run"])
    assert exit_info.value.code == 2
    assert message in _error_line(capsys)


def _stale_kernels_dir(tmp_path: Path) -> Path:
    shutil.copytree(local_kernel_repo("effi_ode_step"), tmp_path / "effi_ode_step")
    (tmp_path / "effi_ode_step" / "torch-ext" / "effi_ode_step" / "op.py").write_text("# edited\n")
    return tmp_path


def test_stale_build_is_refused(tmp_path, capsys):
    kernels_dir = _stale_kernels_dir(tmp_path)
    with pytest.raises(ValueError, match="out of date"):
        push_kernels.upload_plan(push_kernels.PushKernelsArguments(repo_id="me", kernels_dir=str(kernels_dir)))
    with pytest.raises(SystemExit) as exit_info:
        push_kernels.main(["--repo-id", "me", "--kernels_dir", str(kernels_dir)])
    assert exit_info.value.code == 2
    assert "effi_ode_step/build is out of date with torch-ext/; run python scripts/build_kernels.py" in _error_line(
        capsys
    )
