"""The op and the module on the selected device (``--device`` / $AGENT_ATTENTION_TEST_DEVICE, default
cuda: skipped without CUDA), in fp32, fp16 and bf16, against the float64 math path on the CPU:
every kernel path (auto, sdpa, gemm, flex), forward and backward, biases, key padding."""
import pytest
import torch

from agent_attention import AgentAttention, _flex
from agent_attention.functional import agent_attention, agent_attention_math, path
from device_support import DTYPES, OP_TOL, assert_close_scaled, assert_same_direction, autocast

pytestmark = pytest.mark.usefixtures("one_thread")
PATHS = ("auto", "sdpa", "gemm", "flex")


@pytest.fixture(autouse=True)
def _cpu_flex_eager(request, monkeypatch):
    """On the CPU the flex cases run FlexAttention eagerly (torch's reference; compiling the CPU kernel
    takes minutes here, and test_flex_compiled_cpu covers it); on CUDA they run the compiled kernels."""
    if "test_device" in request.fixturenames and request.getfixturevalue("test_device").type == "cpu":
        monkeypatch.setattr(_flex, "EAGER", True)


def _inputs(B=2, h=2, N=196, M=196, n=49, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(q=mk(B, h, N, d), k=mk(B, h, M, d), v=mk(B, h, M, d), agents=mk(B, h, n, d),
                agent_bias=mk(1, h, n, M), query_bias=mk(1, h, N, n))


def _flex_grad_supported(device, name):
    return not (name == "flex" and device.type == "cpu")  # torch has no FlexAttention backward on the CPU


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n", [49, 144])
def test_op_forward(test_device, name, dtype, bias, n):
    x = _inputs(n=n)
    if not bias:
        x.pop("agent_bias"), x.pop("query_bias")
    ref = agent_attention_math(**x)
    dt = DTYPES[dtype]
    dev = {k: t.to(test_device, dt) for k, t in x.items()}
    with torch.no_grad(), path(name):
        out = agent_attention(**dev)
    assert out.dtype == dt and out.device.type == test_device.type
    assert_close_scaled(out, ref, OP_TOL[(test_device.type, dt)], f"{name} {dtype}")


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_op_backward(test_device, name, dtype):
    x = _inputs(N=100, M=100, n=16, seed=1)
    leaves = {k: t.clone().requires_grad_() for k, t in x.items()}
    grad_out = torch.randn(2, 2, 100, 32, dtype=torch.float64)
    ref = torch.autograd.grad(agent_attention_math(**leaves), list(leaves.values()), grad_out)
    dt = DTYPES[dtype]
    dev = {k: t.to(test_device, dt).requires_grad_() for k, t in x.items()}
    with path(name):
        out = agent_attention(**dev)
    grads = torch.autograd.grad(out, list(dev.values()), grad_out.to(test_device, dt))
    tol = OP_TOL[(test_device.type, dt)]
    for key, g, r in zip(dev, grads, ref):
        assert g.dtype == dt
        assert_close_scaled(g, r, 4 * tol, f"{name} {dtype} grad {key}")


@pytest.mark.parametrize("name", PATHS)
def test_op_key_padding(test_device, name):
    x = _inputs(N=64, M=80, n=9, seed=2)
    kpm = torch.zeros(2, 80, dtype=torch.bool)
    kpm[0, 50:] = True
    kpm[1] = True  # a sample with no key: zero attention term on every path
    kw = dict(scale=0.2, query_scale=0.05)
    ref = agent_attention_math(**x, key_padding_mask=kpm, **kw)
    dev = {k: t.to(test_device, torch.float32) for k, t in x.items()}
    with torch.no_grad(), path(name):
        out = agent_attention(**dev, key_padding_mask=kpm.to(test_device), **kw)
    assert_close_scaled(out, ref, OP_TOL[(test_device.type, torch.float32)], name)
    assert out[1].abs().max() == 0


def _module(seed=0, **kw):
    torch.manual_seed(seed)
    m = AgentAttention(64, 2, 16, window=7, **kw)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 3:  # agent biases well away from zero: a dropped bias must show
                p.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("prefix", [0, 1])
def test_module_forward_backward_autocast(test_device, name, dtype, prefix):
    """AgentAttention on a 9 × 11 grid (agents on a 3 × 5 grid: biases resized both ways), fp32
    weights, autocast in fp16/bf16, against the same module in fp32 on the CPU."""
    m = _module(num_prefix_tokens=prefix).train()
    m.agent_shape = (3, 5)
    x = torch.randn(2, 99 + prefix, 64, generator=torch.Generator().manual_seed(3))
    ref = m(x, (9, 11))
    ref.square().sum().backward()  # a sum: fp16 gradients stay clear of underflow
    ref_grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    dev_m = m.to(test_device)
    dt = DTYPES[dtype]
    with path(name), autocast(test_device, dt):
        out = dev_m(x.to(test_device), (9, 11))
    assert_close_scaled(out.float(), ref, 4 * OP_TOL[(test_device.type, dt)], f"{name} {dtype}")
    if not _flex_grad_supported(test_device, name):
        return  # (the module then keeps the other paths: covered by the auto case)
    out.float().square().sum().backward()
    min_cos = 0.9999 if dt == torch.float32 else 0.99
    for k, p in dev_m.named_parameters():
        assert_same_direction(p.grad, ref_grads[k], min_cos, f"{name} {dtype} grad {k}")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_module_flex_inference_matches_sdpa(test_device, dtype):
    """The module at inference: flex (factored biases) against the automatic path, same device and dtype."""
    m = _module(num_prefix_tokens=1).eval().to(test_device, DTYPES[dtype])
    x = torch.randn(3, 1 + 12 * 10, 64, device=test_device, dtype=DTYPES[dtype])
    with torch.inference_mode():
        ref = m(x, (12, 10))
        with path("flex"):
            out = m(x, (12, 10))
    assert_close_scaled(out, ref, 2 * OP_TOL[(test_device.type, DTYPES[dtype])], dtype)


@pytest.mark.slow
def test_flex_compiled_cpu(monkeypatch):
    """The compiled FlexAttention kernels on the CPU (inference; compiling takes minutes here)."""
    monkeypatch.setattr(_flex, "EAGER", False)
    m = _module(num_prefix_tokens=1).eval()
    x = torch.randn(2, 1 + 9 * 11, 64)
    with torch.inference_mode():
        ref = m(x, (9, 11))
        with path("flex"):
            out = m(x, (9, 11))
    assert_close_scaled(out, ref, 1e-5, "compiled flex on cpu")
