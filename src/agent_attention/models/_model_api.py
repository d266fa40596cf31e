"""The timm model API the families share: classifier and feature plumbing, input checks, the block
runner (activation checkpointing) and init.

:class:`ClassifierMixin` (``head``, ``reset_classifier``, ``set_grad_checkpointing`` on the one
flag ``grad_checkpointing``, the dense-prediction hooks), :class:`HierarchicalMixin` (stem, stages
opened by a merge, final norm, NHWC features: Swin / CSWin). Shape checks on the input are FX leaf
functions (:func:`timm.models.register_notrace_function`), so ``torch.fx`` traces the models.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from timm.models import register_notrace_function, register_notrace_module
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._grids import HW, fx_tracing

__all__ = ["take_indices", "check_output_fmt", "merged_hw", "to_nchw", "check_image", "run_blocks", "init_linear_norm",
           "check_pool", "check_dynamic_img_size", "init_kwargs", "opaque_forward", "FeatureMap", "feature_maps",
           "ClassifierMixin", "HierarchicalMixin"]


def take_indices(num: int, indices) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices`` with a ValueError instead of an assert."""
    from timm.models._features import feature_take_indices

    try:
        return feature_take_indices(num, indices)
    except (AssertionError, RuntimeError) as e:
        raise ValueError(f"invalid feature indices {indices!r} for {num} stages: {e}") from None


def check_output_fmt(output_fmt: str, allowed: Sequence[str]) -> None:
    if output_fmt not in allowed:
        raise ValueError(f"output_fmt must be {' or '.join(map(repr, allowed))}, got {output_fmt!r}")


def merged_hw(hw: HW) -> HW:
    """Grid after a stride-2 merge of an ``hw`` map (odd sizes padded): ``(ceil(H/2), ceil(W/2))``."""
    return (hw[0] + 1) // 2, (hw[1] + 1) // 2


def to_nchw(x: Tensor, hw: HW, contiguous: bool = True) -> Tensor:
    """Tokens ``(B, H·W, C)`` -> ``(B, C, H, W)`` (``contiguous=False``: the strided view, as PVT)."""
    x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)
    return x.contiguous() if contiguous else x


@register_notrace_function  # FX: a leaf (Python checks on the input's shape)
def check_image(x: Tensor, in_chans: int, name: str, min_size: int = 1) -> None:
    """TypeError / ValueError unless ``x`` is an image batch ``(B, in_chans, H, W)`` with ``H, W >= min_size``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: input must be a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{name}: expected an image batch (B, {in_chans}, H, W), got {tuple(x.shape)}")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"{name}: input size {tuple(x.shape[2:])} too small: needs at least {min_size}x{min_size}")


def opaque_forward(module: nn.Module, *args):
    """``module.forward_impl(*args)``. A family file wraps this function for ``torch.fx``
    (``torch.fx.wrap("opaque_forward")``) and calls it from the ``forward`` of a block whose Python
    follows the map size (window geometry, padding), so that any FX tracer, torchvision's included,
    records the block as one call (timm's tracer already keeps it a leaf module)."""
    return module.forward_impl(*args)


@register_notrace_module  # FX: a leaf for timm's tracer (torchvision's traces its reshape)
class FeatureMap(nn.Module):
    """A stage's tokens ``(B, P + H·W, C)`` as the map ``(B, C, H, W)`` (``P`` prefix tokens dropped).

    The FX feature taps: ``feature_info[i]["module"]`` names the ``FeatureMap`` of stage ``i``, which
    the model calls while FX traces it (and, where the forward needs the map anyway, always), so that
    ``features_only=True, feature_cls="fx"`` and torchvision's ``create_feature_extractor`` return
    the NCHW maps of ``forward_intermediates``. No parameters: the state dict is unchanged."""

    def __init__(self, num_prefix_tokens: int = 0, contiguous: bool = True):
        super().__init__()
        self.num_prefix_tokens, self.contiguous = num_prefix_tokens, contiguous

    def forward(self, x: Tensor, hw: HW) -> Tensor:
        if self.num_prefix_tokens:
            x = x[:, self.num_prefix_tokens:]
        return to_nchw(x, hw, self.contiguous)


def feature_maps(n: int, **kwargs) -> nn.ModuleList:
    """``n`` :class:`FeatureMap` taps (the ``feature_maps`` of a model)."""
    return nn.ModuleList(FeatureMap(**kwargs) for _ in range(n))


def run_blocks(blocks: Iterable[nn.Module], x: Tensor, hw: HW, checkpointing: bool = False) -> Tensor:
    """``x = blk(x, hw)`` for each block, through activation checkpointing when ``checkpointing`` is
    set and gradients are being recorded."""
    use = checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
    for blk in blocks:
        x = checkpoint(blk, x, hw, use_reentrant=False) if use else blk(x, hw)
    return x


# ---------------------------------------------------------------- classifier plumbing
def init_linear_norm(m: nn.Module) -> None:
    """Official init: Linear trunc_normal(0.02) / zero bias, LayerNorm 1 / 0."""
    from timm.layers import trunc_normal_

    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def check_pool(global_pool: str, allowed: Sequence[str] = ("avg", "")) -> str:
    if global_pool not in allowed:
        raise ValueError(f"global_pool must be {' or '.join(map(repr, allowed))}, got {global_pool!r}")
    return global_pool


def check_dynamic_img_size(dynamic_img_size: bool, name: str) -> bool:
    """timm's ``dynamic_img_size``: the families always run at any input size (position embeddings
    and agent biases follow the actual grid), so only ``True`` is accepted."""
    if dynamic_img_size is not True:
        raise ValueError(f"{name} always runs at any input size (positions and biases follow the actual grid); "
                         f"dynamic_img_size must be True, got {dynamic_img_size!r}")
    return True


def init_kwargs(frame_locals: dict) -> dict:
    """The constructor arguments, from ``locals()`` taken first thing in ``__init__`` (for
    :meth:`ClassifierMixin.set_input_size`)."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


#: ``Module.__dict__`` entries :meth:`ClassifierMixin.set_input_size` takes from the rebuilt model
_REBUILT = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


class ClassifierMixin:
    """timm classifier API shared by the families: ``head`` on ``num_features``, ``forward``.

    ``global_pools`` lists the accepted ``global_pool`` values; ``forward`` (the family file's own,
    so that ``torch.fx`` wraps the leaf functions that file calls), ``forward_head`` and
    ``forward_features`` come from the family (or :class:`HierarchicalMixin`).
    """

    num_features: int
    num_classes: int
    global_pool: str
    global_pools: Tuple[str, ...] = ("avg", "")
    grad_checkpointing: bool = False
    #: agent grids per stage of the official downstream (detection / segmentation) configs, or None
    downstream_agent_shapes: Optional[Tuple[HW, ...]] = None
    #: the official downstream model normalises each stage output (dense backbones add ``norm{i}``)
    downstream_output_norms: bool = False

    @torch.jit.ignore
    def set_downstream_windows(self) -> int:
        """Switch to the official downstream window rule (dense backbones); returns the number of
        blocks changed. No rule by default."""
        return 0

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    #: whether a classifier can take the unpooled features (``global_pool=''``): token / NHWC
    #: features can (per-position logits, as timm's Swin), NCHW maps cannot
    unpooled_classifier: bool = True

    def check_head(self, num_classes: int, global_pool: str) -> None:
        """ValueError for a classifier on unpooled NCHW features (timm refuses it too)."""
        if global_pool == "" and num_classes > 0 and not self.unpooled_classifier:
            raise ValueError(f"{type(self).__name__}: global_pool='' (no pooling) needs num_classes=0: "
                             "a linear classifier cannot take its unpooled NCHW feature maps")

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.check_head(num_classes, check_pool(global_pool, self.global_pools))
            self.global_pool = global_pool
        else:
            self.check_head(num_classes, self.global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def resized_state_dict(self, target: nn.Module) -> dict:
        """This model's weights for ``target``, a model of the same family built for another input
        size (the family's checkpoint filter resizes the learned grids)."""
        raise NotImplementedError

    @torch.jit.ignore
    def set_input_size(self, img_size=None, **kwargs) -> None:
        """timm's ``set_input_size``: rebuild the construction-size geometry (position embeddings,
        agent bias tables, windows / stripes) for ``img_size``, keeping the learned weights (resized
        as for a checkpoint of another size), device, dtype, mode, pretrained cfg and hooks. The
        model runs at any size either way; the construction size is where no resize happens (the
        official outputs). Only ``img_size`` can be changed; new parameter objects are made, so
        build the optimizer after calling it."""
        if kwargs:
            raise ValueError(f"{type(self).__name__}.set_input_size: only img_size can be changed, got {sorted(kwargs)}")
        if img_size is None:
            return
        init = getattr(self, "init_kwargs", None)
        if init is None:  # pragma: no cover - every family records it
            raise ValueError(f"{type(self).__name__}.set_input_size: the constructor arguments were not recorded")
        ref = next(self.parameters())
        with torch.random.fork_rng(devices=[]):  # the rebuild's random init leaves the caller's RNG alone
            fresh = type(self)(**{**init, "img_size": img_size, "num_classes": self.num_classes,
                                  "global_pool": self.global_pool})
        try:
            fresh.load_state_dict(self.resized_state_dict(fresh))
        except RuntimeError as e:
            raise ValueError(f"{type(self).__name__}.set_input_size: the model was changed after it was built "
                             f"(pruned?): {str(e).splitlines()[0]}") from None
        frozen = {n for n, p in self.named_parameters() if not p.requires_grad}
        checkpointing = self.grad_checkpointing
        fresh.to(device=ref.device, dtype=ref.dtype).train(self.training)
        for n, p in fresh.named_parameters():
            p.requires_grad_(n not in frozen)
        for k, v in fresh.__dict__.items():  # geometry attributes and the rebuilt modules; hooks stay
            if k in _REBUILT or not k.startswith("_") and k != "training":
                self.__dict__[k] = v
        self.set_grad_checkpointing(checkpointing)


class HierarchicalMixin(ClassifierMixin):
    """Swin / CSWin: a stem, then stages each opened by an optional merge (``output_hw``), a final
    ``norm`` and NHWC features.

    The family provides ``_embed(x) -> (tokens, hw)`` and ``_merge_stage_pairs()``: per stage, the
    merge that opens it (or ``None``) and a function running its blocks.
    """

    norm: nn.Module
    feature_maps: nn.ModuleList

    def forward_features(self, x: Tensor) -> Tensor:
        """Final-normed features ``(B, H/32, W/32, C)`` (NHWC, like timm's Swin)."""
        x, hw = self._embed(x)
        for i, (merge, run) in enumerate(self._merge_stage_pairs()):
            if merge is not None:
                x, hw = merge(x, hw), merge.output_hw(hw)
            x = run(x, hw)
            if fx_tracing():  # the FX feature tap of this stage (feature_info[i]["module"])
                self.feature_maps[i](x, hw)
        x = self.norm(x)
        return x.view(x.shape[0], hw[0], hw[1], -1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """NHWC features -> pooled features (``pre_logits``) or logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs before each merge (dims C, 2C, 4C, 8C at strides 4..32), timm style."""
        check_output_fmt(output_fmt, ("NCHW", "NHWC"))
        stages = self._merge_stage_pairs()
        last = len(stages) - 1
        take, max_index = take_indices(len(stages), indices)
        if stop_early:
            stages = stages[: max_index + 1]
        x, hw = self._embed(x)
        intermediates = []
        for i, (merge, run) in enumerate(stages):
            if merge is not None:
                x, hw = merge(x, hw), merge.output_hw(hw)
            x = run(x, hw)
            if i in take:
                y = to_nchw(self.norm(x) if norm and i == last else x, hw)
                intermediates.append(y if output_fmt == "NCHW" else y.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        x = self.norm(x) if len(stages) == last + 1 else x
        return x.view(x.shape[0], hw[0], hw[1], -1), intermediates

    def _prune_tail(self, max_index: int, num_stages: int, prune_norm: bool, prune_head: bool) -> bool:
        """After the stages past ``max_index`` are removed: features, norm and head; True if any was."""
        prune_end = max_index < num_stages - 1
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return prune_end
