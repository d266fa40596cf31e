"""AgentSD on the selected device (``--device`` / $AGENT_ATTENTION_TEST_DEVICE, default cuda: skipped
without CUDA): a tiny SD UNet in fp16 and bf16 with AgentSD applied, against the same UNet in fp32 on
the CPU, through the automatic kernels and the FlexAttention path."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402

from agent_attention import _flex  # noqa: E402
from agent_attention.diffusion import apply_agentsd, remove_agentsd  # noqa: E402
from agent_attention.functional import path  # noqa: E402
from device_support import DTYPES, assert_mean_close  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,  # 2 heads of 16 (flex needs >= 16 on CUDA)
    ).eval()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["auto", "flex"])
def test_agentsd_half_precision_on_device(test_device, dtype, name, monkeypatch):
    if test_device.type == "cpu":
        monkeypatch.setattr(_flex, "EAGER", True)  # torch's eager FlexAttention (compiling takes minutes here)
    unet = _unet()
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        plain = unet(x, 10, e).sample
        state = apply_agentsd(unet, use_rand=False)
        ref = unet(x, 10, e).sample
        assert state.calls["agent"] == 3
        dt = DTYPES[dtype]
        unet.to(test_device, dt)
        with path(name):
            out = unet(x.to(test_device, dt), 10, e.to(test_device, dt)).sample
    assert out.dtype == dt and out.device.type == test_device.type
    assert state.calls["agent"] == 6  # the device run went through AgentSD too
    # rounding may pair a few near-tied tokens differently when merging: compared on average
    assert_mean_close(out.float(), ref, 0.05, f"AgentSD {dtype} {name}")
    assert (ref - plain).abs().mean() > 1e-3 * plain.abs().mean()  # AgentSD changed the output
    remove_agentsd(unet)
