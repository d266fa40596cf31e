"""Training and evaluation under bf16 autocast on CPU: every model family trains (finite loss and
gradients that point where the fp32 ones do, loss going down), and the bench's training step runs."""
import pytest
import torch
import torch.nn.functional as F

from agent_attention.bench.models import inference_fn, train_step_fn
from agent_attention.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["agent_deit_t", "agent_pvt_t", "agent_swin_t", "agent_cswin_t"]


def _loss(model, x, y, dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        logits = model(x)
    return F.cross_entropy(logits.float(), y)


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_autocast_training_steps(name):
    torch.manual_seed(0)
    model = create_model(name, img_size=64, num_classes=4, drop_path_rate=0.0).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    _loss(model, x, y, None).backward()
    g32 = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    _loss(model, x, y, torch.bfloat16).backward()
    g16 = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert torch.isfinite(g16).all()
    assert F.cosine_similarity(g16, g32, dim=0) > 0.95
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, x, y, torch.bfloat16)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_bench_step_functions_under_bf16():
    torch.manual_seed(0)
    model = create_model("agent_pvt_t", img_size=64, num_classes=10)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = train_step_fn(model.train(), opt, x, y, torch.bfloat16)()
    assert torch.isfinite(loss) and all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    out = inference_fn(model.eval(), x, torch.bfloat16)()
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10)
    ref = inference_fn(model, x)()
    assert (out.float() - ref).abs().max() < 0.1
