"""The official-style baseline of `bench models` computes the same function as our models (logits and
gradients), on the same weights, and leaves the model as it was."""
import pytest
import torch

from agent_attention import AgentAttention
from agent_attention.bench.official import official_attend, official_style
from agent_attention.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

# (model, image size): the construction size, and one whose Swin windows need padding masks
CASES = [("agent_deit_t", 64), ("agent_pvt_t", 64), ("agent_swin_t", 64), ("agent_cswin_t", 64),
         ("agent_swin_t", 80)]


def _model(name, size):
    torch.manual_seed(0)
    return create_model(name, img_size=size, num_classes=10)


@pytest.mark.parametrize("name,size", CASES)
def test_same_logits_as_our_model(name, size):
    model = _model(name, 64).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = model(x)
        with official_style(model):
            theirs = model(x)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert not (theirs == ours).all()  # a different computation, equal to float rounding


@pytest.mark.parametrize("name", ["agent_deit_t", "agent_swin_t"])
def test_same_gradients_as_our_model(name):
    model = _model(name, 64).train()
    x = torch.randn(2, 3, 64, 64)

    def grads():
        torch.manual_seed(1)  # the same drop-path draws
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ours = grads()
    with official_style(model):
        theirs = grads()
    assert ours.keys() == theirs.keys() and any("an_bias" in k for k in ours)
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], atol=1e-5, rtol=1e-4, msg=k)


def test_context_restores_the_modules_and_nests():
    model = _model("agent_pvt_t", 64)
    mods = [m for m in model.modules() if isinstance(m, AgentAttention)]
    with official_style(model):
        assert all(m.attend.__func__ is official_attend for m in mods)
        with official_style(model):
            pass
        assert all("attend" in m.__dict__ for m in mods)  # the inner block did not undo the outer
    assert all("attend" not in m.__dict__ for m in mods)


def test_clear_errors():
    with pytest.raises(ValueError, match="no AgentAttention"):
        with official_style(torch.nn.Linear(2, 2)):
            pass
    m = AgentAttention(16, 2, 4, ndim=1)
    with pytest.raises(ValueError, match="2-D self-attention"):
        official_attend(m, torch.randn(1, 8, 16), torch.randn(1, 8, 16), torch.randn(1, 8, 16), None)
