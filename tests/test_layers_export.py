"""Export readiness of the op and the module: torch.export with dynamic batch and grid, ONNX
(dynamo exporter) + onnxruntime, FX symbolic tracing."""
import pytest
import torch
from torch import nn

from agent_attention import AgentAttention


class Wrapper(nn.Module):
    """An image-in, image-out block: the grid comes from the input's shape (symbolic when exported)."""

    def __init__(self, prefix: int = 0, **kw):
        super().__init__()
        self.attn = AgentAttention(32, num_heads=2, agent_num=9, window=(7, 7), num_prefix_tokens=prefix, **kw)
        self.prefix = prefix
        with torch.no_grad():
            for p in self.attn.parameters(recurse=False):
                p.normal_(0, 0.5)

    def forward(self, img):
        x = img.flatten(2).transpose(1, 2)
        if self.prefix:
            x = torch.cat([x.mean(1, keepdim=True), x], dim=1)
        y = self.attn(x, img.shape[-2:])
        return y[:, self.prefix:].transpose(1, 2).reshape(img.shape)


def _dynamic():
    B, H, W = torch.export.Dim("B", min=1, max=64), torch.export.Dim("H", min=2, max=256), torch.export.Dim("W", min=2, max=256)
    return {"img": {0: B, 2: H, 3: W}}


@pytest.mark.parametrize("prefix", [0, 1])
def test_torch_export_dynamic_batch_and_grid(prefix):
    m = Wrapper(prefix).eval()
    ep = torch.export.export(m, (torch.randn(2, 32, 10, 12),), dynamic_shapes=_dynamic())
    for shape in [(1, 32, 7, 7), (3, 32, 15, 9), (2, 32, 4, 22)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), m(x), atol=1e-5, rtol=1e-5)


def test_onnx_dynamo_export_matches_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = Wrapper(1).eval()
    path = tmp_path / "block.onnx"
    torch.onnx.export(m, (torch.randn(2, 32, 10, 12),), str(path), dynamo=True, dynamic_shapes=_dynamic())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for shape in [(1, 32, 14, 14), (2, 32, 9, 17)]:
        x = torch.randn(shape)
        with torch.no_grad():
            ref = m(x).numpy()
        out = sess.run(None, {name: x.numpy()})[0]
        assert abs(out - ref).max() <= 1e-4


def test_fx_symbolic_trace():
    m = Wrapper(1).eval()
    gm = torch.fx.symbolic_trace(m)
    for shape in [(2, 32, 10, 12), (1, 32, 5, 17)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), m(x))
    # backward through the traced graph
    gm.train()
    gm(torch.randn(2, 32, 6, 6)).sum().backward()
    assert gm.attn.an_bias.grad is not None


def test_fx_symbolic_trace_sequences_with_mask():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = AgentAttention(16, 2, 4, ndim=1)

        def forward(self, x, mask):
            return self.attn(x, key_padding_mask=mask)

    m = Seq().eval()
    gm = torch.fx.symbolic_trace(m)
    x, mask = torch.randn(2, 11, 16), torch.zeros(2, 11, dtype=torch.bool)
    mask[0, 7:] = True
    torch.testing.assert_close(gm(x, mask), m(x, mask))
