"""Export of the zoo: torch.export with dynamic batch and H×W, ONNX (dynamo) + onnxruntime, per family,
evaluated at two sizes other than the example's."""
import pytest
import torch

from agent_attention.models import create_model
from agent_attention.models.export import export_onnx, export_program, min_size, size_multiple

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny configs of each family with the released geometry: global agent blocks (their DWC on the
# whole map, batch-sized), shifted window blocks padded at the test sizes (Swin stage 2), two-branch
# stripes padded at the test sizes (CSWin stage 3)
TINY = {
    "agent_deit_tiny": dict(embed_dim=32, depth=2, num_heads=2, img_size=64, patch_size=16, agent_num=4, num_classes=7),
    "agent_pvt_tiny": dict(img_size=64, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1],
                           mlp_ratios=[2, 2, 2, 2], agent_num=[4, 9, 4, 4], num_classes=7),
    "agent_cswin_tiny": dict(img_size=64, embed_dim=16, depth=(1, 1, 2, 1), num_heads=(2, 2, 4, 4),
                             agent_num=[4, 9, 4, 4], split_size=(1, 2, 3, 7), num_classes=7),
    "agent_swin_tiny": dict(img_size=64, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4),
                            agent_num=[4, 9, 4, 4], attn_type="ABBB", num_classes=7),
}
SIZES = [(1, 128, 64), (3, 96, 160)]  # batch, H, W: batch 1 and 3, two non-square sizes, neither the example's (2, 64, 96)


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


@pytest.mark.parametrize("name", list(TINY))
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


def test_swin_window_blocks_have_a_minimum_dynamic_size():
    # the released layout: window 7, shifted odd blocks; the last stage (7x7 at 224) covers its map
    model = create_model("agent_swin_t", img_size=224, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4),
                         agent_num=[4, 9, 4, 4], attn_type="AABB", num_classes=7).eval()
    assert min_size(model) == 224  # stage 4 needs its full 7x7 window (7*32 px); stage 3 (shifted) 8*16 px
    assert min_size(_model("agent_swin_tiny")) == 64 and min_size(_model("agent_pvt_tiny")) == 32
    with pytest.raises(ValueError, match="at least 224x224"):
        export_program(model, (2, 3, 192, 224))
    export_program(model, (2, 3, 192, 224), dynamic=False)  # a fixed size exports below the minimum


def test_export_command_pt2_verifies(tmp_path, capsys):
    import json

    from agent_attention.cli import main

    out = tmp_path / "pvt.pt2"
    kw = json.dumps({k: v for k, v in TINY["agent_pvt_tiny"].items() if k != "num_classes"})
    assert main(["export", "--model", "agent_pvt_t", "--format", "pt2", "--model-kwargs", kw, "--size", "64", "96",
                 "--output", str(out), "--verify"]) == 0
    assert out.is_file() and "max |export - eager|" in capsys.readouterr().out
    assert main(["export", "--model", "agent_pvt_x"]) == 2


def _kw(name):
    import json

    return json.dumps({k: v for k, v in TINY[name].items() if k != "num_classes"})


def test_export_command_batch_1_swin(tmp_path, capsys):
    # a batch-1 example still gives a dynamic-batch program (traced at batch 2), verified at batch 1 and 3
    from agent_attention.cli import main

    out = tmp_path / "swin.pt2"
    assert main(["export", "--model", "agent_swin_t", "--format", "pt2", "--model-kwargs", _kw("agent_swin_tiny"),
                 "--size", "64", "96", "--batch", "1", "--output", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "verify (1, 3, 128, 96)" in text and "verify (3, 3, 64, 160)" in text
    prog = torch.export.load(str(out)).module()
    assert prog(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_export_command_writes_no_file_that_fails_verification(tmp_path, capsys, monkeypatch):
    from agent_attention.cli import main
    from agent_attention.commands import export as cmd

    monkeypatch.setattr(cmd, "_verify", lambda *a, **k: 0.5)  # an export that differs from eager
    out = tmp_path / "pvt.pt2"
    assert main(["export", "--model", "agent_pvt_t", "--format", "pt2", "--model-kwargs", _kw("agent_pvt_tiny"),
                 "--size", "64", "--output", str(out), "--verify"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "verification failed" in err and "0.5" in err
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp file


def test_cswin_stripes_have_a_minimum_dynamic_size():
    # released layout: split 7 in stage 3 (two stripe branches at a stride of 16) -> 112 px, 128 on the 32 px step
    model = create_model("agent_cswin_t", embed_dim=16, depth=(1, 1, 2, 1), num_heads=(2, 2, 4, 4),
                         agent_num=[4, 9, 4, 4], num_classes=7).eval()
    assert model.export_min_size() == 112 and min_size(model) == 128
    assert min_size(_model("agent_cswin_tiny")) == 64
    with pytest.raises(ValueError, match="at least 128x128"):
        export_program(model, (2, 3, 96, 128))
