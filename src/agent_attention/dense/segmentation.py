"""Semantic segmentation over agent backbones: the official Semantic FPN and UperNet.

:class:`Segmenter` is mmsegmentation's ``EncoderDecoder`` as the released Agent Attention models
build it (``downstream/segmentation`` configs), with the official module names:

* ``backbone`` — an :class:`~agent_attention.dense.backbone.AgentBackbone` with the official
  downstream settings, without input padding (mmseg's ``whole`` inference feeds the resized image
  as is; the patch embedding pads to 4 and patch merging pads odd maps);
* Semantic FPN: ``neck`` (:class:`~agent_attention.dense.seg_heads.FPNNeck`) + ``decode_head``
  (:class:`~agent_attention.dense.seg_heads.FPNHead`);
* UperNet: ``decode_head`` (:class:`~agent_attention.dense.seg_heads.UPerHead`) + ``auxiliary_head``
  (:class:`~agent_attention.dense.seg_heads.FCNHead` on stage 3, loss weight 0.4, training only).

``encode_decode(x)`` takes the normalised image and returns the decode head's logits resized
(bilinear, ``align_corners=False``) to the input size, as mmseg's ``encode_decode``;
``forward(images)`` takes images in ``[0, 1]`` and normalises them first (ImageNet mean / std, the
configs' ``img_norm_cfg``). :meth:`Segmenter.load_official_state_dict` loads a released mmseg
``state_dict`` (key map: the FPN neck's names, nothing else).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .backbone import AgentBackbone, AgentShapesSpec
from .seg_heads import FCNHead, FPNHead, FPNNeck, UPerHead, fpn_neck_key, resize

SEGMENTERS = ("fpn", "upernet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # mmseg's (123.675, 116.28, 103.53) / 255
IMAGENET_STD = (0.229, 0.224, 0.225)   # mmseg's (58.395, 57.12, 57.375) / 255

__all__ = ["SEGMENTERS", "Segmenter", "build_segmenter"]


class Segmenter(nn.Module):
    """Backbone (+ FPN neck) + decode head (+ auxiliary head); see :func:`build_segmenter`."""

    def __init__(self, kind: str, backbone: AgentBackbone, num_classes: int, *, decoder_channels: int = 256,
                 segmentation_channels: int = 128, dropout: float = 0.1, aux_channels: Optional[int] = None,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if kind not in SEGMENTERS:
            raise ValueError(f"unknown segmentation head {kind!r}; choose one of {SEGMENTERS}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if len(backbone.out_channels) != 4 or backbone.strides != [4, 8, 16, 32]:
            raise ValueError(f"segmentation heads need 4 backbone maps at strides 4/8/16/32, got strides {backbone.strides}")
        self.kind, self.num_classes, self.backbone = kind, num_classes, backbone
        chans = list(backbone.out_channels)
        if kind == "fpn":
            self.neck = FPNNeck(chans, decoder_channels)
            self.decode_head = FPNHead([decoder_channels] * 4, backbone.strides, segmentation_channels, num_classes, dropout)
        else:
            self.neck = None
            self.decode_head = UPerHead(chans, decoder_channels, (1, 2, 3, 6), num_classes, dropout)
        # on the third level of extract_feat (backbone stage 3; the FPN's third level when there is a neck)
        aux_in = decoder_channels if kind == "fpn" else chans[2]
        self.auxiliary_head = FCNHead(aux_in, aux_channels, 1, num_classes, dropout) if aux_channels else None
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def aux_head(self) -> Optional[nn.Module]:
        """The auxiliary head (the training loop's name for it)."""
        return self.auxiliary_head

    def extract_feat(self, x: Tensor) -> List[Tensor]:
        """Backbone (and neck) features of a normalised image batch."""
        feats = self.backbone(x)
        return self.neck(feats) if self.neck is not None else feats

    def encode_decode(self, x: Tensor) -> Tensor:
        """mmseg's ``encode_decode``: decode-head logits of normalised images, resized to their size."""
        return resize(self.decode_head(self.extract_feat(x)), x.shape[2:])

    def normalize(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Segmenter expects images (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
        return (images - self.image_mean) / self.image_std

    def forward(self, images: Tensor, with_aux: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Logits ``(B, K, H, W)`` for images ``(B, 3, H, W)`` in [0, 1]; ``with_aux`` also returns the
        auxiliary head's logits (resized the same way; training)."""
        x = self.normalize(images)
        if not with_aux:
            return self.encode_decode(x)
        if self.auxiliary_head is None:
            raise ValueError("this segmenter has no auxiliary head (build it with aux_channels)")
        feats = self.extract_feat(x)
        size = x.shape[2:]
        return resize(self.decode_head(feats), size), resize(self.auxiliary_head(feats[2]), size)

    @torch.no_grad()
    def predict(self, images: Tensor, size: Optional[Tuple[int, int]] = None) -> Tensor:
        """Class map ``(B, H, W)`` (int64); ``size``: resize the logits to it first (the original image
        size, as mmseg's ``rescale``)."""
        logits = self(images)
        if size is not None and tuple(size) != tuple(logits.shape[2:]):
            logits = resize(logits, size)
        return logits.argmax(1)

    # ------------------------------------------------------------------ official checkpoints
    def official_key(self, key: str) -> str:
        """Our key of an official mmseg ``state_dict`` entry."""
        head, _, rest = key.partition(".")
        if head == "backbone":
            return "backbone." + AgentBackbone.official_key(rest)
        if head == "neck" and self.neck is not None:
            return "neck." + fpn_neck_key(rest)
        return key

    def convert_official(self, state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        return {self.official_key(k): v for k, v in state.items()}

    def load_official_state_dict(self, state: Mapping[str, Tensor], strict: bool = True):
        """Load a released mmseg ``state_dict``; ``strict``: its keys and shapes must be exactly ours
        (one-line error naming the first differences otherwise)."""
        try:
            mapped = self.convert_official(state)
        except ValueError as e:
            raise ValueError(f"{self.kind} segmenter: {e}") from None
        if strict:
            own = self.state_dict()
            missing, unexpected = sorted(set(own) - set(mapped)), sorted(set(mapped) - set(own))
            bad = sorted(k for k in set(own) & set(mapped) if tuple(own[k].shape) != tuple(mapped[k].shape))
            if missing or unexpected or bad:
                raise ValueError(f"{self.kind} segmenter ({self.backbone.name}): the state dict does not fit "
                                 f"({len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                                 f"{len(bad)} other shapes {bad[:3]})")
        return self.load_state_dict(mapped, strict=strict)


def build_segmenter(kind: str = "fpn", backbone: str = "agent_pvt_s", num_classes: int = 150, *,
                    pretrained_backbone=None, strict: bool = True, agent_shapes: AgentShapesSpec = "official",
                    decoder_channels: Optional[int] = None, segmentation_channels: int = 128,
                    aux_channels: Optional[int] = -1, dropout: float = 0.1,
                    backbone_kwargs: Optional[Dict] = None) -> Segmenter:
    """Semantic FPN (``"fpn"``) or UperNet (``"upernet"``) over an agent backbone, as the official configs.

    Args:
        pretrained_backbone: ImageNet classification checkpoint of the backbone (path or state dict).
        decoder_channels: FPN neck width (256, Semantic FPN) or UperNet head width (512).
        segmentation_channels: Semantic FPN head width (128).
        aux_channels: width of the auxiliary FCN head on stage 3; ``-1`` = official (256 for UperNet,
            none for FPN); ``None``/``0`` = no auxiliary head.
        backbone_kwargs: passed to :class:`AgentBackbone` (``drop_path_rate``, tiny dims …).
    """
    if kind not in SEGMENTERS:
        raise ValueError(f"unknown segmentation head {kind!r}; choose one of {SEGMENTERS}")
    if decoder_channels is None:
        decoder_channels = 256 if kind == "fpn" else 512
    if aux_channels == -1:
        aux_channels = 256 if kind == "upernet" else None
    kwargs = dict(backbone_kwargs or {})
    kwargs.setdefault("size_divisor", 1)  # official: no padding of the input
    body = AgentBackbone(backbone, agent_shapes=agent_shapes, checkpoint=pretrained_backbone, strict=strict, **kwargs)
    return Segmenter(kind, body, num_classes, decoder_channels=decoder_channels,
                     segmentation_channels=segmentation_channels, dropout=dropout, aux_channels=aux_channels or None)
