"""``simple_cnn``: the plain convolutional network of the project's founding paper, sized for 28 to 224 px inputs.

The paper's network is a stack of convolution + pooling blocks, fully connected layers with dropout and a softmax
output. Here each block is two 3x3 convolutions with batch normalisation and ReLU (VGG-style, Simonyan & Zisserman,
ICLR 2015; Ioffe & Szegedy, ICML 2015), blocks are separated by 2x2 max pooling, and the number of blocks grows with
the input size so the last feature map is 7 to 14 px: 3 blocks at 28 px (MedMNIST), 4 at 64 px, 5 from 112 px.

Deviations from the paper, and why:

* Global average pooling (Lin et al., ICLR 2014) instead of flattening the last feature map: the network then runs
  at any input size, has far fewer parameters, and its last feature map is spatially aligned with the class
  evidence, which is what CAM/Grad-CAM read (Zhou et al., CVPR 2016).
* No softmax layer: the module returns logits (see :func:`medxai.models.create_model`).
* No pooling after the last block: Grad-CAM at ``features.block<N>`` then has twice the resolution.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from medxai.models._registry import register_model

__all__ = ["SimpleCNN", "simple_cnn", "num_blocks_for"]

_WIDTHS = (32, 64, 128, 256, 256)
_DEFAULT_DROPOUT = 0.25


def num_blocks_for(input_size: int) -> int:
    """Number of conv blocks for ``input_size`` px inputs: the last map is ~7-14 px; between 3 and 5 blocks."""
    return min(len(_WIDTHS), max(3, int(math.log2(max(input_size, 1) / 7)) + 1))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3-BN-ReLU twice; the conv bias is redundant before batch norm."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(out_channels),
            relu1=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            bn2=nn.BatchNorm2d(out_channels),
            relu2=nn.ReLU(inplace=True),
        )
    )


class SimpleCNN(nn.Module):
    """Conv blocks, global average pooling, a hidden fully connected layer with dropout, a linear classifier.

    Args:
        num_classes: number of output logits.
        in_chans: input channels.
        num_blocks: number of conv blocks (3 to 5), named ``features.block1`` ... ``features.block<num_blocks>``.
        hidden_features: width of the hidden fully connected layer.
        dropout: dropout probability before the classifier.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        num_blocks: int = 3,
        hidden_features: int = 128,
        dropout: float = _DEFAULT_DROPOUT,
    ) -> None:
        super().__init__()
        if not 1 <= num_blocks <= len(_WIDTHS):
            raise ValueError(f"num_blocks must be in 1..{len(_WIDTHS)}, got {num_blocks}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_chans
        for index, width in enumerate(_WIDTHS[:num_blocks], start=1):
            if index > 1:
                layers[f"pool{index - 1}"] = nn.MaxPool2d(2)
            layers[f"block{index}"] = _conv_block(channels, width)
            channels = width
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(1),
                hidden=nn.Linear(channels, hidden_features),
                relu=nn.ReLU(inplace=True),
                dropout=nn.Dropout(dropout),
                fc=nn.Linear(hidden_features, num_classes),
            )
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` for images ``(batch, in_chans, height, width)``."""
        return self.head(self.pool(self.features(x)))


@register_model(
    "simple_cnn",
    cam_layer=lambda input_size: f"features.block{num_blocks_for(input_size)}",
    classifier="head.fc",
    stages=lambda input_size: tuple(f"features.block{index}" for index in range(1, num_blocks_for(input_size) + 1)),
    default_input_size=28,
    description="Plain VGG-style CNN of the founding paper (3-5 conv blocks by input size); fast on CPU at 28 px",
)
def simple_cnn(
    num_classes: int, in_chans: int, input_size: int, dropout: float | None, *, hidden_features: int = 128
) -> SimpleCNN:
    """Plain VGG-style CNN of the founding paper, depth chosen from ``input_size``; dropout 0.25 by default."""
    return SimpleCNN(
        num_classes,
        in_chans,
        num_blocks=num_blocks_for(input_size),
        hidden_features=hidden_features,
        dropout=_DEFAULT_DROPOUT if dropout is None else dropout,
    )
