"""Every model family on the selected device (``--device`` / $AGENT_ATTENTION_TEST_DEVICE, default
cuda: skipped without CUDA): forward and a training step under fp16/bf16 autocast against fp32 on the
CPU, torch.export of the device model, and torch.compile on CUDA."""
import pytest
import torch

from agent_attention.models import create_model
from agent_attention.models.export import export_program
from device_support import DTYPES, MODEL_TOL, TINY_MODELS, assert_mean_close, assert_same_direction, autocast

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = list(TINY_MODELS)


def _model(name):
    torch.manual_seed(0)
    return create_model(name, drop_path_rate=0.0, **TINY_MODELS[name])  # no randomness in training mode


def _batch(seed=0, size=(64, 96)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, *size, generator=g), torch.tensor([1, 5])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_family_forward_backward(test_device, name, dtype):
    model = _model(name).train()
    x, y = _batch()
    torch.manual_seed(1)  # the same stochastic layers (none at these settings) on both sides
    loss_ref = torch.nn.functional.cross_entropy(model(x), y)
    loss_ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.no_grad():
        ref_logits = model.eval()(x)
    dev = model.train().to(test_device)
    dt = DTYPES[dtype]
    with autocast(test_device, dt):
        loss = torch.nn.functional.cross_entropy(dev(x.to(test_device)), y.to(test_device))
    loss.backward()
    assert torch.isfinite(loss)
    assert_mean_close(loss.float()[None], loss_ref[None], MODEL_TOL[dt], f"{name} {dtype} loss")
    min_cos = 0.999 if dt == torch.float32 else 0.95
    grads = {k: p.grad for k, p in dev.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    flat = torch.cat([grads[k].double().cpu().flatten() for k in sorted(grads)])
    flat_ref = torch.cat([ref_grads[k].double().flatten() for k in sorted(grads)])
    assert_same_direction(flat, flat_ref, min_cos, f"{name} {dtype} all gradients")
    with torch.no_grad(), autocast(test_device, dt):
        logits = dev.eval()(x.to(test_device))
    assert_mean_close(logits.float(), ref_logits, MODEL_TOL[dt], f"{name} {dtype} logits")


@pytest.mark.parametrize("name", NAMES)
def test_family_export_on_device(test_device, name):
    """torch.export of the model on the device (dynamic batch and size), run at another size."""
    model = _model(name).eval().to(test_device)
    ep = export_program(model, torch.randn(2, 3, 64, 96, device=test_device))
    x = torch.randn(3, 3, 96, 64, device=test_device)
    with torch.no_grad():
        ref = model(x)
        out = ep.module()(x)
    assert out.device.type == test_device.type
    assert_mean_close(out, ref, 1e-4, f"{name} exported")


@pytest.mark.parametrize("name", NAMES)
def test_family_compile_on_cuda(test_device, name):
    """torch.compile of a training step in bf16 autocast (CUDA only: compiling on the CPU takes
    minutes and is covered by the model tests)."""
    if test_device.type != "cuda":
        pytest.skip("torch.compile is checked on CUDA only")
    model = _model(name).to(test_device)
    x, y = _batch(2)
    x, y = x.to(test_device), y.to(test_device)
    with torch.no_grad():
        ref = model.eval()(x)
    compiled = torch.compile(model)
    with torch.no_grad():
        out = compiled(x)
    assert_mean_close(out, ref, 2e-3, f"{name} compiled")
    compiled.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
