"""The kernel repos: build/ is up to date with torch-ext/, both load through `kernels.get_local_kernel`, a Hub repo
id redirected by LOCAL_KERNELS loads through `kernels.get_kernel`, a broken repo names repo, variant and reason,
and the loss falls back (logged) or raises as asked; the layer mapping and `kernelize_model` on CPU."""

import importlib.util
import json
import logging
import shutil

import kernels
import pytest
import torch
from kernels import LocalLayerRepository, Mode

from hf_effitrain.hub.modeling_ode_shared import OdeStepRMSNorm
from hf_effitrain.integrations.kernel_mapping import effi_kernel_mapping, kernelize_model
from hf_effitrain.ops import (
    KernelLoadError,
    fused_linear_cross_entropy,
    kernel_loading,
    linear_cross_entropy_reference,
    load_kernel_module,
    local_kernel_repo,
    set_kernel_source,
)
from hf_effitrain.ops import linear_cross_entropy as lce_module
from tests.kernels.kernels_helpers import import_script, loss_and_grads, make_inputs
from tests.testing_utils import clear_log_once

KERNEL_NAMES = ("effi_linear_cross_entropy", "effi_ode_step")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the kernels import triton")


@pytest.fixture(autouse=True)
def _fresh_kernel_sources():
    load_kernel_module.cache_clear()
    yield
    for name in KERNEL_NAMES:
        set_kernel_source(name)  # back to the local folder (also clears the cache)


def test_build_folders_are_up_to_date():
    assert import_script("build_kernels").main(["--check"]) == 0


@needs_triton
@pytest.mark.parametrize(
    "name, exports",
    [
        ("effi_linear_cross_entropy", ("linear_cross_entropy",)),
        ("effi_ode_step", ("ode_step_rms_norm", "layers")),
    ],
)
def test_local_kernel_repo_loads_with_get_local_kernel(name, exports):
    module = kernels.get_local_kernel(local_kernel_repo(name))
    assert all(hasattr(module, attr) for attr in exports)
    metadata = json.loads((local_kernel_repo(name) / "build" / "torch-cpu" / "metadata.json").read_text())
    assert module.__name__ == metadata["id"]


@needs_triton
def test_hub_repo_id_redirected_by_local_kernels(monkeypatch):
    monkeypatch.setenv("LOCAL_KERNELS", f"someone/effi-ode-step={local_kernel_repo('effi_ode_step')}")
    set_kernel_source("effi_ode_step", "someone/effi-ode-step", version=1)
    assert hasattr(load_kernel_module("effi_ode_step"), "ode_step_rms_norm")


def test_set_kernel_source_validates():
    with pytest.raises(ValueError, match="unknown kernel"):
        set_kernel_source("effi_nothing")
    with pytest.raises(ValueError, match="exactly one of version= or revision="):
        set_kernel_source("effi_ode_step", "someone/effi-ode-step")


@pytest.fixture
def broken_kernels_dir(tmp_path, monkeypatch):
    """A copy of the kernel repos whose linear cross-entropy metadata lacks the mandatory python-depends."""
    for name in KERNEL_NAMES:
        shutil.copytree(local_kernel_repo(name), tmp_path / name)
    for metadata_path in (tmp_path / "effi_linear_cross_entropy" / "build").glob("*/metadata.json"):
        metadata = json.loads(metadata_path.read_text())
        del metadata["python-depends"]
        metadata_path.write_text(json.dumps(metadata))
    monkeypatch.setenv("EFFI_KERNELS_DIR", str(tmp_path))
    return tmp_path


def test_broken_repo_error_names_repo_variant_and_reason(broken_kernels_dir):
    with pytest.raises(KernelLoadError) as error:
        load_kernel_module("effi_linear_cross_entropy")
    message = str(error.value)
    assert str(broken_kernels_dir / "effi_linear_cross_entropy") in message
    assert "torch-cpu" in message and "python-depends" in message


def test_missing_build_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFI_KERNELS_DIR", str(tmp_path))
    with pytest.raises(KernelLoadError, match="no build/ folder"):
        load_kernel_module("effi_ode_step")


def _assert_loss_falls_back_once(monkeypatch, caplog, message: str):
    """The default fused loss, where the kernel could run but does not load: it logs `message` once over two calls
    and returns the torch reference's loss and gradients. Returns the inputs it used."""
    monkeypatch.setattr(
        lce_module, "_kernel_unavailable_reason", lambda hidden, required: None
    )  # loading is what fails
    clear_log_once()
    inputs = make_inputs(9, 8, 19, 2)
    with caplog.at_level(logging.WARNING, logger=lce_module.__name__):
        got = [loss_and_grads(fused_linear_cross_entropy, *inputs, "mean") for _ in range(2)][-1]
    assert len([r for r in caplog.records if message in r.getMessage()]) == 1
    torch.testing.assert_close(got, loss_and_grads(linear_cross_entropy_reference, *inputs, "mean"))
    return inputs


def test_loss_falls_back_with_one_warning_or_raises(broken_kernels_dir, monkeypatch, caplog):
    inputs = _assert_loss_falls_back_once(monkeypatch, caplog, "could not load kernel repo")
    with pytest.raises(KernelLoadError, match="effi_linear_cross_entropy"):
        fused_linear_cross_entropy(*inputs[:3], use_kernel=True)


def test_disable_kernel_mapping_turns_the_default_kernel_off(monkeypatch):
    monkeypatch.setenv("DISABLE_KERNEL_MAPPING", "1")
    assert "DISABLE_KERNEL_MAPPING" in lce_module._kernel_unavailable_reason(torch.empty(0, device="meta"), False)


def test_mapping_points_at_the_local_layer():
    mapping = effi_kernel_mapping(("cuda", "cpu"))
    repo = mapping["EffiOdeStepRMSNorm"]["cuda"]
    assert isinstance(repo, LocalLayerRepository) and repo.layer_name == "EffiOdeStepRMSNorm"
    with pytest.raises(ValueError, match="devices must be"):
        effi_kernel_mapping(("mps",))


def test_kernelize_model_on_cpu_keeps_eager_and_says_why(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = torch.nn.Sequential(OdeStepRMSNorm(8))
    with caplog.at_level(logging.INFO, logger="hf_effitrain.integrations.kernel_mapping"):
        kernelize_model(model, mode=Mode.TRAINING)
    assert "forward" not in model[0].__dict__
    assert any("TRITON_INTERPRET" in r.getMessage() for r in caplog.records)


def test_failed_load_is_cached_until_set_kernel_source(monkeypatch):
    attempts = []

    def unreachable_hub(*args, **kwargs):
        attempts.append(args)
        raise OSError("hub unreachable")

    monkeypatch.setattr(kernels, "get_kernel", unreachable_hub)
    # pretend the kernel could run here, so that loading it is what fails
    monkeypatch.setattr(lce_module, "_kernel_unavailable_reason", lambda hidden, required: None)
    clear_log_once()
    set_kernel_source("effi_linear_cross_entropy", "someone/effi-linear-cross-entropy", version=1)
    inputs = make_inputs(6, 8, 11, 1)
    for _ in range(4):  # four training steps: one Hub attempt, then the cached failure and the torch reference
        fused_linear_cross_entropy(*inputs[:3])
    assert len(attempts) == 1
    with pytest.raises(KernelLoadError, match="hub unreachable") as first:
        load_kernel_module("effi_linear_cross_entropy")
    with pytest.raises(KernelLoadError) as second:
        load_kernel_module("effi_linear_cross_entropy")
    assert second.value is first.value and len(attempts) == 1
    set_kernel_source("effi_linear_cross_entropy", "someone/effi-linear-cross-entropy", version=2)  # clears it
    with pytest.raises(KernelLoadError):
        load_kernel_module("effi_linear_cross_entropy")
    assert len(attempts) == 2


@pytest.fixture
def wheel_install(tmp_path, monkeypatch):
    """The package as a wheel installs it: `<package>/../kernels` is the `kernels` library, not our kernel repos."""
    site_kernels = tmp_path / "site-packages" / "kernels"
    site_kernels.mkdir(parents=True)
    (site_kernels / "__init__.py").write_text("")
    monkeypatch.delenv("EFFI_KERNELS_DIR", raising=False)
    monkeypatch.setattr(kernel_loading, "_CHECKOUT_KERNELS_DIR", site_kernels)
    return site_kernels


def test_wheel_install_without_local_repos_says_what_to_do(wheel_install, monkeypatch, caplog):
    with pytest.raises(KernelLoadError, match="no local kernel repositories") as error:
        kernel_loading.local_kernels_dir()
    assert "EFFI_KERNELS_DIR" in str(error.value) and "set_kernel_source" in str(error.value)
    with pytest.raises(KernelLoadError, match="no local kernel repositories"):
        load_kernel_module("effi_ode_step")
    # the default loss logs once and runs the torch reference; use_kernel=True raises
    inputs = _assert_loss_falls_back_once(monkeypatch, caplog, "no local kernel repositories")
    with pytest.raises(KernelLoadError, match="EFFI_KERNELS_DIR"):
        fused_linear_cross_entropy(*inputs[:3], use_kernel=True)
    # the EFFI_KERNELS_DIR override still names the folder it is given
    monkeypatch.setenv("EFFI_KERNELS_DIR", str(wheel_install.parent / "checkout_kernels"))
    assert kernel_loading.local_kernels_dir() == wheel_install.parent / "checkout_kernels"


def test_kernelize_model_keeps_eager_when_the_kernels_do_not_load(wheel_install, monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that the device check passes and loading is what fails
    model = torch.nn.Sequential(OdeStepRMSNorm(8))
    with caplog.at_level(logging.WARNING, logger="hf_effitrain.integrations.kernel_mapping"):
        kernelize_model(model, mode=Mode.TRAINING, device="cpu")
    assert "forward" not in model[0].__dict__
    assert any("no local kernel repositories" in r.getMessage() for r in caplog.records)
    x = torch.randn(2, 8)
    torch.testing.assert_close(model[0](x, x, 0.5)[1], OdeStepRMSNorm.forward(model[0], x, x, 0.5)[1])
    with pytest.raises(KernelLoadError, match="no local kernel repositories"):
        kernelize_model(model, mode=Mode.TRAINING, device="cpu", use_fallback=False)
