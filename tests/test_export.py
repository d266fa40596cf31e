"""Export of the zoo: torch.export with dynamic batch and H×W, ONNX (dynamo) + onnxruntime, per family,
evaluated at two sizes other than the example's."""
import pytest
import torch

from agent_attention.models import create_model
from agent_attention.models.export import export_onnx, export_program, size_multiple

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny configs of each family (one block per stage)
TINY = {
    "agent_deit_tiny": dict(embed_dim=32, depth=2, num_heads=2, img_size=64, patch_size=16, agent_num=4, num_classes=7),
    "agent_pvt_tiny": dict(img_size=64, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1],
                           mlp_ratios=[2, 2, 2, 2], agent_num=[4, 9, 4, 4], num_classes=7),
    "agent_cswin_tiny": dict(img_size=64, embed_dim=16, depth=(1, 1, 2, 1), num_heads=(2, 2, 4, 4),
                             agent_num=[4, 9, 4, 4], split_size=(1, 2, 7, 7), num_classes=7),
    # agent blocks only: the window ('B') blocks do not export with a dynamic size yet (docs/models_export.md)
    "agent_swin_tiny": dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                            agent_num=[4, 9, 4, 4], attn_type="AAAA", num_classes=7),
}
SIZES = [(1, 128, 64), (3, 96, 160)]  # batch, H, W: neither is the example's (2, 64, 96)


def _model(name):
    torch.manual_seed(0)
    return create_model(name, **TINY[name]).eval()


@pytest.mark.parametrize("name", list(TINY))
def test_torch_export_dynamic_batch_and_size(name):
    model = _model(name)
    ep = export_program(model, (2, 3, 64, 96))
    for b, h, w in SIZES:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["agent_pvt_tiny", "agent_deit_tiny"])
def test_onnx_dynamo_matches_eager(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _model(name)
    path = export_onnx(model, tmp_path / f"{name}.onnx", (2, 3, 64, 96))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b, h, w in SIZES:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {"x": x.numpy()})[0]
        assert out.shape == ref.shape and abs(out - ref).max() <= 1e-4


def test_size_multiple_and_errors():
    assert size_multiple(_model("agent_deit_tiny")) == 16 and size_multiple(_model("agent_pvt_tiny")) == 32
    with pytest.raises(ValueError, match="image batch"):
        export_program(_model("agent_pvt_tiny"), torch.randn(3, 64, 64))


def test_export_command_pt2_verifies(tmp_path, capsys):
    import json

    from agent_attention.cli import main

    out = tmp_path / "pvt.pt2"
    kw = json.dumps({k: v for k, v in TINY["agent_pvt_tiny"].items() if k != "num_classes"})
    assert main(["export", "--model", "agent_pvt_t", "--format", "pt2", "--model-kwargs", kw, "--size", "64", "96",
                 "--output", str(out), "--verify"]) == 0
    assert out.is_file() and "max |export - eager|" in capsys.readouterr().out
    assert main(["export", "--model", "agent_pvt_x"]) == 2
