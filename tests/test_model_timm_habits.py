"""timm's habits on every family: FX feature extraction (timm's ``feature_cls="fx"`` and torchvision's
``create_feature_extractor`` with no tracer arguments), ``channels_last``, ``set_input_size``,
``dynamic_img_size`` and the ``global_pool`` checks. One tiny model per family."""
import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from agent_attention.models import list_models
from agent_attention.models.registry import TEST_KWARGS, family_of

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILY_NAMES = sorted({family_of(n): n for n in list_models(aliases=False)}.values())  # one model per family
SIZE = (96, 128)


def _tiny(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **{**TEST_KWARGS[f"agent_{family_of(name)}"], **kw})


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_fx_features_only_are_the_getter_maps(name):
    x = torch.randn(1, 3, *SIZE)
    getter = _tiny(name, features_only=True).eval()
    fx = _tiny(name, features_only=True, feature_cls="fx").eval()
    with torch.inference_mode():
        want, got = getter(x), fx(x)
    assert len(got) == len(want) and fx.feature_info.channels() == getter.feature_info.channels()
    for g, w, c in zip(got, want, getter.feature_info.channels()):
        assert g.dim() == 4 and g.shape[1] == c  # NCHW maps, not tokens
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_torchvision_feature_extractor_without_tracer_arguments(name):
    model = _tiny(name, num_classes=5).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    taps = [i["module"] for i in model.feature_info]
    assert all(any(n == t or n.startswith(t + ".") for n in eval_nodes) for t in taps)
    fx = create_feature_extractor(model, return_nodes=taps + [eval_nodes[-1]])
    x = torch.randn(2, 3, *SIZE)
    with torch.inference_mode():
        out = list(fx(x).values())
        maps = model.forward_intermediates(x, intermediates_only=True)
        logits = model(x)
    assert len(out) == len(maps) + 1
    for g, w in zip(out, maps):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(out[-1], logits, rtol=1e-5, atol=1e-6)
    fx.train()
    next(iter(fx(x).values())).mean().backward()  # the stage-1 map trains its parameters
    assert model.state_dict().keys() == _tiny(name, num_classes=5).state_dict().keys()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_channels_last_keeps_the_official_layout(name):
    model = _tiny(name, num_classes=5).eval()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        ref = model(x)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    params = list(model.parameters())
    assert model.to(memory_format=torch.channels_last) is model  # raised on the 5-D row/column agent biases
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-5)
    model.train()(x.contiguous(memory_format=torch.channels_last)).mean().backward()
    model.to(memory_format=torch.channels_last)  # with gradients (timm's --channels-last training)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    model.load_state_dict(_tiny(name, num_classes=5).state_dict())  # strict


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_set_input_size(name):
    from agent_attention.models.registry import model_class

    model = _tiny(name, num_classes=5).eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        before = model(x)
    handle = model.register_forward_hook(lambda *a: None)
    model.set_input_size(img_size=SIZE)
    assert model.init_kwargs["img_size"] == SIZE and len(model._forward_hooks) == 1 and not model.training
    assert "input_size" in model.pretrained_cfg  # cfg kept
    handle.remove()
    fresh = _tiny(name, num_classes=5, img_size=SIZE).eval()  # a model built at the new size ...
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    with torch.no_grad():
        after = model(x)
        if family_of(name) != "swin":  # ... where no run-time resize happens: the resize moved into the weights
            torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
        else:  # Swin's windows follow the construction size (timm's Swin too): as a checkpoint loaded at the new size
            ref = _tiny(name, num_classes=5).eval()
            fresh.load_state_dict(model_class("swin").resized_state_dict(ref, fresh))
            torch.testing.assert_close(after, fresh(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="only img_size"):
        model.set_input_size(patch_size=8)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_dynamic_img_size_is_accepted(name):
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(_tiny(name, dynamic_img_size=True).eval()(x), _tiny(name).eval()(x))
    with pytest.raises(ValueError, match="any input size"):
        _tiny(name, dynamic_img_size=False)


def test_pvt_refuses_a_classifier_on_unpooled_maps():
    with pytest.raises(ValueError, match="global_pool='' .*needs num_classes=0"):
        _tiny("agent_pvt_tiny", global_pool="")
    model = _tiny("agent_pvt_tiny")
    with pytest.raises(ValueError, match="needs num_classes=0"):
        model.reset_classifier(5, global_pool="")
    model.reset_classifier(0, global_pool="")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 64, 2, 2)
    swin = _tiny("agent_swin_tiny", global_pool="")  # NHWC tokens: per-position logits, as timm's Swin
    assert swin(torch.randn(1, 3, 64, 64)).shape == (1, 2, 2, 1000)
