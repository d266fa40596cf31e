"""`agent-attention show`: captured maps are the ones the block applies; the figure is written for
every family; bad input is a clear usage error."""
import numpy as np
import pytest
import torch

from agent_attention.models import create_model
from agent_attention.commands.show import main
from agent_attention.viz import agent_maps, capture_agent_calls, load_image, select_call

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pvt_calls():
    torch.manual_seed(0)
    model = create_model("agent_pvt_t", img_size=64).eval()
    return model, capture_agent_calls(model, torch.randn(1, 3, 64, 64))


def test_blocks_are_grouped_by_stage(pvt_calls):
    model, calls = pvt_calls
    assert [c.label for c in calls] == ["1.0", "1.1", "2.0", "2.1", "3.0", "3.1", "4.0", "4.1"]
    assert [c.hw for c in calls[::2]] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert select_call(calls, "2.1") is select_call(calls, "block2.1.attn") is select_call(calls, "3")
    with pytest.raises(ValueError, match="not found.*block1.0.attn"):
        select_call(calls, "5.0")
    assert not any("attend" in vars(m) for m in model.modules())  # hooks removed


def test_maps_are_softmaxes_and_reproduce_the_block(pvt_calls):
    _, calls = pvt_calls
    call = calls[2]  # stage 2: 16 agents, 2 heads, 8x8 grid
    m = call.module
    for head in (0, 1):
        maps = agent_maps(call, head=head)
        a2t, t2a = maps["agent_to_token"], maps["token_to_agent"]
        assert a2t.shape == t2a.shape == (8, 8, 16) and maps["agent_grid"] == (4, 4)
        np.testing.assert_allclose(a2t.sum((0, 1)), 1, rtol=1e-5)  # each agent: softmax over tokens
        np.testing.assert_allclose(t2a.sum(-1), 1, rtol=1e-5)  # each token: softmax over agents
        # the maps reproduce this head of the block's attention output (attend minus the DWC branch)
        d = m.head_dim
        v = call.v[0, :, head * d:(head + 1) * d].numpy()
        phi_q, phi_k = t2a.reshape(64, 16), a2t.reshape(64, 16)
        with torch.no_grad():
            dwc = m.dwc(call.v.transpose(1, 2).reshape(1, m.dim, 8, 8)).flatten(2).transpose(1, 2)
            out = (m.attend(call.q, call.k, call.v, call.hw) - dwc)[0, :, head * d:(head + 1) * d].numpy()
        np.testing.assert_allclose(phi_q @ (phi_k.T @ v), out, atol=1e-5)
    with pytest.raises(ValueError, match="--head"):
        agent_maps(call, head=2)


def test_windowed_calls_are_refused(pvt_calls):
    import dataclasses

    _, calls = pvt_calls
    c = calls[2]
    windows = dataclasses.replace(c, q=c.q.repeat(4, 1, 1), k=c.k.repeat(4, 1, 1), v=c.v.repeat(4, 1, 1))
    with pytest.raises(ValueError, match="windows or stripes"):
        agent_maps(windows)


def test_class_token_is_excluded():
    model = create_model("agent_deit_t", img_size=64).eval()
    calls = capture_agent_calls(model, torch.randn(1, 3, 64, 64))
    maps = agent_maps(calls[0])
    assert calls[0].q.shape[1] == 1 + 16 and maps["agent_to_token"].shape == (4, 4, 49)
    # with the class token dropped an agent's weights over the grid sum to less than one
    assert (maps["agent_to_token"].sum((0, 1)) < 1).all()


def test_load_image(tmp_path):
    img = load_image(None, 48)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    from PIL import Image

    Image.fromarray(np.zeros((30, 60, 3), np.uint8)).save(tmp_path / "wide.png")
    assert load_image(str(tmp_path / "wide.png"), 40).shape == (40, 40, 3)
    with pytest.raises(ValueError, match="no such file"):
        load_image(str(tmp_path / "missing.jpg"), 40)
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(str(tmp_path / "bad.jpg"), 40)


@pytest.mark.parametrize("name,block", [("agent_pvt_t", "1.0"), ("agent_deit_t", "1.3"), ("agent_swin_t", "2.1"),
                                        ("agent_cswin_t", "2.0")])
def test_show_writes_a_png_for_every_family(tmp_path, capsys, name, block):
    out = tmp_path / f"{name}.png"
    assert main(["--model", name, "--img-size", "64", "--block", block, "--agents", "0", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "wrote" in capsys.readouterr().out


def test_show_usage_errors(tmp_path, capsys):
    base = ["--img-size", "64", "--out", str(tmp_path / "x.png")]
    for argv, msg in ((["--block", "9.9"], "not found"), (["--agents", "9"], "out of range"),
                      (["--model", "agent_nope"], "unknown model"), (["--image", "missing.jpg"], "no such file")):
        assert main(base + argv) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    assert main(base + ["--list-blocks"]) == 0
    assert "block4.1.attn" in capsys.readouterr().out
