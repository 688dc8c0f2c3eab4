"""The fused ODE step + RMSNorm kernel against the eager `OdeStepRMSNorm` (forward, gradients, float32 / bfloat16),
and `kernelize` swapping the layer's forward in and back, on a lone layer and on a tiny `OdeSharedForCausalLM`."""

import pytest
import torch
from kernels import Mode, kernelize

from hf_effitrain.hub.configuration_ode_shared import OdeSharedConfig
from hf_effitrain.hub.modeling_ode_shared import OdeSharedForCausalLM, OdeStepRMSNorm
from hf_effitrain.integrations.kernel_mapping import kernelize_model
from hf_effitrain.ops import load_kernel_module

# (atol, rtol): in bf16 the kernel adds x + h*u in float32 and rounds once, eager rounds h*u first (1 ulp apart)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2)}
GRAD_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (6e-2, 5e-2)}


def _layer(hidden_size, device, seed=0):
    torch.manual_seed(seed)
    layer = OdeStepRMSNorm(hidden_size, eps=1e-5).to(device)
    layer.weight.data.normal_(1.0, 0.1)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 24), (7, 33), (1, 1, 64)])
def test_kernel_matches_eager_layer(kernel_device, dtype, shape):
    layer = _layer(shape[-1], kernel_device)
    kernel = load_kernel_module("effi_ode_step")
    x = torch.randn(shape, device=kernel_device).to(dtype).requires_grad_()
    update = torch.randn(shape, device=kernel_device).to(dtype).requires_grad_()
    eager = layer(x, update, 0.37)
    fused = kernel.ode_step_rms_norm(x, update, layer.weight, 0.37, layer.variance_epsilon)
    atol, rtol = TOL[dtype]
    for got, want in zip(fused, eager):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    # same upstream gradients for both, so the comparison isolates the backward
    grads_out = [torch.randn_like(t) for t in eager]
    params = (x, update, layer.weight)
    want_grads = torch.autograd.grad(eager, params, grads_out)
    got_grads = torch.autograd.grad(fused, params, grads_out)
    atol, rtol = GRAD_TOL[dtype]
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def test_kernel_op_passes_opcheck(kernel_device):
    kernel = load_kernel_module("effi_ode_step")
    x, update = torch.randn(2, 3, 16, device=kernel_device), torch.randn(2, 3, 16, device=kernel_device)
    weight = torch.rand(16, device=kernel_device, requires_grad=True)
    torch.library.opcheck(
        kernel.ode_step_rms_norm_forward,
        (x.requires_grad_(), update, weight, 0.5, 1e-6),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_kernelize_swaps_the_layer_forward_and_back(kernel_device):
    model = torch.nn.Sequential(_layer(24, kernel_device))
    x, update = torch.randn(4, 24, device=kernel_device), torch.randn(4, 24, device=kernel_device)
    eager = model[0](x, update, 0.5)
    kernelize_model(model, mode=Mode.INFERENCE, device=kernel_device)
    assert model[0].forward.__func__.__qualname__ == "EffiOdeStepRMSNorm.forward"
    for got, want in zip(model[0](x, update, 0.5), eager):
        torch.testing.assert_close(got, want)
    # outside the package's mapping, kernels' own kernelize falls back to the eager forward
    kernelize(model, mode=Mode.INFERENCE, device=kernel_device)
    assert model[0].forward.__func__ is OdeStepRMSNorm.forward


def test_kernelize_ode_shared_model_keeps_its_logits(kernel_device, monkeypatch):
    torch.manual_seed(0)
    config = OdeSharedConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    model = OdeSharedForCausalLM(config).float().eval().to(kernel_device)
    input_ids = torch.randint(0, 64, (2, 7), device=kernel_device)
    with torch.no_grad():
        eager = model(input_ids).logits
        kernelize_model(model, mode=Mode.INFERENCE)
        swapped = [m for m in model.modules() if isinstance(m, OdeStepRMSNorm) and "forward" in m.__dict__]
        assert swapped and len(swapped) == sum(isinstance(m, OdeStepRMSNorm) for m in model.modules())
        torch.testing.assert_close(model(input_ids).logits, eager, atol=1e-5, rtol=1e-5)
        if kernel_device == "cpu":  # without the interpreter the CPU has no kernel: the eager forwards come back
            monkeypatch.delenv("TRITON_INTERPRET")
            kernelize_model(model, mode=Mode.INFERENCE)
            assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, OdeStepRMSNorm))
            torch.testing.assert_close(model(input_ids).logits, eager)


def test_kernel_layer_promotes_like_eager_under_autocast(kernel_device):
    # autocast: the solver's update comes out of bf16 matmuls while the residual stream stays float32
    layer = _layer(24, kernel_device)
    project = torch.nn.Linear(24, 24).to(kernel_device)
    model = torch.nn.Sequential(layer)
    x = torch.randn(3, 5, 24, device=kernel_device, requires_grad=True)
    outputs = {}
    for name in ("eager", "kernel"):
        if name == "kernel":
            kernelize_model(model, mode=Mode.TRAINING, device=kernel_device)
            assert layer.forward.__func__.__qualname__ == "EffiOdeStepRMSNorm.forward"
        with torch.autocast(kernel_device, dtype=torch.bfloat16):
            update = project(x)
            assert update.dtype == torch.bfloat16 and x.dtype == torch.float32
            result = layer(x, update, 0.37)
        grads = torch.autograd.grad([t.float().square().sum() for t in result], (x, layer.weight, project.weight))
        outputs[name] = result, grads
    (got, got_grads), (want, want_grads) = outputs["kernel"], outputs["eager"]
    atol, rtol = TOL[torch.bfloat16]
    for got_t, want_t in zip(got, want):
        assert got_t.dtype == want_t.dtype == torch.float32
        torch.testing.assert_close(got_t, want_t, atol=atol, rtol=rtol)
    atol, rtol = GRAD_TOL[torch.bfloat16]
    for got_g, want_g in zip(got_grads, want_grads):
        assert got_g.dtype == want_g.dtype
        torch.testing.assert_close(got_g, want_g, atol=atol, rtol=rtol)
