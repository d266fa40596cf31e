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
