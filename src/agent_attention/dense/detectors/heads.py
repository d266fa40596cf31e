"""The RoI heads of the official configs, in the official state-dict layout.

* :class:`ConvFCBBoxHead` — mmdet's ``ConvFCBBoxHead``: ``Shared2FCBBoxHead`` (Mask R-CNN: two FCs)
  and ``Shared4Conv1FCBBoxHead`` (Cascade: four 3×3 conv + BN + ReLU, one FC); class scores with the
  background **last** (``num_classes + 1`` logits), class-specific deltas (``4 · num_classes``);
* :class:`FCNMaskHead` — four 3×3 conv + ReLU, a stride-2 deconv + ReLU, a 1×1 conv to one 28×28
  logit map per class.
"""
from __future__ import annotations

from typing import Tuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvModule", "ConvFCBBoxHead", "FCNMaskHead"]


class ConvModule(nn.Module):
    """mmcv's ``ConvModule``: conv (bias only without norm) -> BatchNorm ``bn`` (optional) -> ReLU (optional)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, norm: bool = False, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=not norm)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        self.bn = nn.BatchNorm2d(cout) if norm else None
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.act else x


class ConvFCBBoxHead(nn.Module):
    """Shared convs + FCs, then ``fc_cls`` (C + 1) and ``fc_reg`` (4 · C).

    ``norm``: BatchNorm after each shared conv (the official Cascade heads use SyncBN, whose layout and
    evaluation are BatchNorm's; convert with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for DDP).
    """

    def __init__(self, num_classes: int, num_convs: int = 0, num_fcs: int = 2, in_channels: int = 256,
                 conv_channels: int = 256, fc_channels: int = 1024, roi_size: int = 7, norm: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.shared_convs = nn.ModuleList([ConvModule(in_channels if i == 0 else conv_channels, conv_channels, 3, norm)
                                           for i in range(num_convs)])
        flat = (conv_channels if num_convs else in_channels) * roi_size * roi_size
        self.shared_fcs = nn.ModuleList([nn.Linear(flat if i == 0 else fc_channels, fc_channels) for i in range(num_fcs)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """Mask head: 14×14 RoI features -> ``(N, num_classes, 28, 28)`` logits."""

    def __init__(self, num_classes: int, in_channels: int = 256, channels: int = 256, num_convs: int = 4):
        super().__init__()
        self.convs = nn.ModuleList([ConvModule(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)])
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)
        for m in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))
