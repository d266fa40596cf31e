"""The contract every registered family keeps (timm's generic model tests, in small): parametrized over
``list_models('agent_*')`` with each family's tiny ``test_kwargs``, so a new family is covered by
registering it."""
import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from agent_attention.models import list_models
from agent_attention.models.registry import ALIASES, FAMILIES, PAPER_TOP1, TEST_KWARGS, family_of

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = list_models(aliases=False)
SIZE = (96, 128)  # off every construction size, a multiple of 32


def _tiny(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **{**TEST_KWARGS[f"agent_{family_of(name)}"], **kw})


def test_registry_is_complete():
    assert len(NAMES) >= 18 and set(NAMES) == set(PAPER_TOP1)
    assert set(timm.list_models("agent_*")) == set(NAMES) | set(ALIASES)
    assert {f"agent_{family_of(n)}" for n in NAMES} == set(FAMILIES) == set(TEST_KWARGS)


@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_follows_timm_rules(name):
    model = _tiny(name).eval()
    cfg, sd = model.pretrained_cfg, model.state_dict()
    assert cfg["first_conv"] + ".weight" in sd and cfg["classifier"] + ".weight" in sd
    assert "url" in cfg and cfg["num_classes"] == 1000
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, *cfg["input_size"][1:]))
        pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size) and model.num_features > 0
    if cfg["pool_size"] is not None:  # spatial features: the unpooled grid at the cfg size
        fmt = getattr(model, "output_fmt", "NCHW")
        hw = feats.shape[1:3] if fmt == "NHWC" else feats.shape[2:]
        assert tuple(hw) == tuple(cfg["pool_size"])
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(torch.randn(1, 3, *SIZE)).shape == (1, model.num_features)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_any_size(name):
    model = _tiny(name, num_classes=5).train()
    out = model(torch.randn(2, 3, *SIZE))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval().set_grad_checkpointing(True)
    assert model.grad_checkpointing


@pytest.mark.parametrize("name", NAMES)
def test_features_and_intermediates(name):
    model = _tiny(name).eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        feats = timm.create_model(name, features_only=True, **TEST_KWARGS[f"agent_{family_of(name)}"]).eval()(x)
    info = model.feature_info
    assert len(inter) == len(info)
    for f, i in zip(inter, info):
        assert f.shape[1] == i["num_chs"] and f.shape[2] <= -(-SIZE[0] // i["reduction"]) + 1
    assert all(f.dim() == 4 for f in feats)


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_matches_eager(name):
    model = _tiny(name, num_classes=5).eval()
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                  tracer_kwargs=kw)
    x = torch.randn(1, 3, *SIZE)
    with torch.inference_mode():
        assert torch.equal(next(iter(fx(x).values())), model(x))
    fx.train()
    next(iter(fx(torch.randn(2, 3, *SIZE)).values())).mean().backward()
    assert all(p.grad is not None for p in fx.parameters())


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_alias_names_its_model(alias):
    assert ALIASES[alias] in NAMES and family_of(alias) == family_of(ALIASES[alias])
