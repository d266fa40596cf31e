"""Agent-Swin's downstream window block against a plain re-implementation of the official mmdet /
mmseg ``SwinTransformerBlock.forward`` (written from its description: pad the normalised map to the
window with zeros, roll, shift mask from slices of the padded map with -100, softmax attention with
the relative position bias over every token of the window, padding included, reverse, crop) at map
sizes without a reference output: smaller than the window, odd, multiples."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agent_attention.models.agent_swin import AgentSwinBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def official_window_block(blk: AgentSwinBlock, x: torch.Tensor, hw, ws: int, shift: int) -> torch.Tensor:
    H, W = hw
    B, L, C = x.shape
    h = blk.attn.num_heads
    shortcut = x
    x = blk.norm1(x).view(B, H, W, C)
    pb, pr = (ws - H % ws) % ws, (ws - W % ws) % ws
    x = F.pad(x, (0, 0, 0, pr, 0, pb))
    Hp, Wp = x.shape[1:3]
    mask = None
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
        img = torch.zeros(1, Hp, Wp)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                img[:, hs, wsl] = cnt
                cnt += 1
        mw = img.view(1, Hp // ws, ws, Wp // ws, ws).permute(0, 1, 3, 2, 4).reshape(-1, ws * ws)
        mask = (mw[:, None, :] - mw[:, :, None]).ne(0).float() * -100.0
    win = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
    attn = blk.attn
    q, k, v = attn.qkv(win).reshape(win.shape[0], ws * ws, 3, h, C // h).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    idx = attn.relative_position_index.view(-1)
    logits = logits + attn.relative_position_bias_table[idx].view(ws * ws, ws * ws, h).permute(2, 0, 1)[None]
    if mask is not None:
        nW = mask.shape[0]
        logits = (logits.view(B, nW, h, ws * ws, ws * ws) + mask[None, :, None]).view(-1, h, ws * ws, ws * ws)
    out = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, ws * ws, C))
    out = out.view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = shortcut + out[:, :H, :W].reshape(B, L, C)
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("hw", [(7, 7), (5, 6), (10, 13), (11, 14), (25, 42), (3, 9)])
@pytest.mark.parametrize("shift", [False, True])
def test_downstream_window_block_equals_official(hw, shift):
    torch.manual_seed(0)
    # built at the classification grid 7x7 (stage 4 of a 224 model): window 7, no shift
    blk = AgentSwinBlock(dim=32, input_resolution=(7, 7), num_heads=2, window_size=7, shift_size=0).eval()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_(0, 1.0)
    blk.set_downstream_window(shift=shift)
    assert blk.attn_mask is None and blk.shift_size == (3 if shift else 0)
    x = torch.randn(2, hw[0] * hw[1], 32)
    with torch.no_grad():
        got = blk(x, hw)
        want = official_window_block(blk, x, hw, 7, 3 if shift else 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_classifier_rule_is_unchanged_where_padding_occurs():
    """Without the downstream switch the block keeps the classifier's rule (padded keys masked),
    which differs from the official downstream block on a padded map."""
    torch.manual_seed(0)
    blk = AgentSwinBlock(dim=32, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3).eval()
    x = torch.randn(1, 10 * 13, 32)
    with torch.no_grad():
        assert not torch.allclose(blk(x, (10, 13)), official_window_block(blk, x, (10, 13), 7, 3), atol=1e-4)
        x = torch.randn(1, 14 * 14, 32)  # no padding: both rules agree
        torch.testing.assert_close(blk(x, (14, 14)), official_window_block(blk, x, (14, 14), 7, 3), rtol=1e-5, atol=1e-5)
