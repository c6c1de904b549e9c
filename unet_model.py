"""3-D U-Net (Ronneberger/Cicek) returning logits.

Input  (batch, in_channels, slices, height, width) = (B, 1, D, H, W) float.
Output (batch, num_classes, D, H, W) logits (no softmax).
D, H and W must each be divisible by 2**(depth - 1). Channels per level are
base_channels * 2**level; the default (32, depth 5) is the seed's 32-64-128-256-512.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("instance", "batch", "group")


def make_norm(kind: str, channels: int) -> nn.Module:
    """Normalisation layer. 'instance' and 'group' do not depend on batch statistics."""
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"norm {kind!r}: choose one of {', '.join(NORMS)}")


class Conv3d(nn.Conv3d):
    """nn.Conv3d, but in fp32 where the CPU's bf16 kernel is wrong.

    Under CPU bf16 autocast, oneDNN (torch 2.13) returns wrong, often non-finite, weight
    gradients for a 3x3x3 convolution of an input with exactly 2 slices and 16 or more channels:
    the bottleneck of a U-Net on a 16- or 32-slice grid. Such inputs are convolved in fp32 (a
    small share of the work); every other case is plain nn.Conv3d. Same parameters, same
    checkpoint keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[2] == 2 and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class ConvBlock(nn.Sequential):
    """(3x3x3 conv -> norm -> LeakyReLU) twice; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__(
            Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet3D(nn.Module):
    """Encoder (conv blocks + 2x max-pooling), decoder (2x transposed conv, concatenated skip,
    conv block), 1x1x1 head."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        base_channels: int = 32,
        depth: int = 5,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth {depth}: a U-Net needs at least 2 levels")
        self.arguments = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "base_channels": base_channels,
            "depth": depth,
            "norm": norm,
        }
        widths = [base_channels * 2**level for level in range(depth)]
        self.encoders = nn.ModuleList(
            ConvBlock(c_in, c_out, norm)
            for c_in, c_out in zip([in_channels] + widths[:-1], widths, strict=True)
        )
        self.pool = nn.MaxPool3d(2)
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2)
            for level in reversed(range(depth - 1))
        )
        self.decoders = nn.ModuleList(
            ConvBlock(2 * widths[level], widths[level], norm)
            for level in reversed(range(depth - 1))
        )
        self.head = nn.Conv3d(widths[0], num_classes, 1)

    @property
    def divisor(self) -> int:
        return 2 ** (self.arguments["depth"] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(size % self.divisor for size in x.shape[2:]):
            raise ValueError(
                f"input grid {tuple(x.shape[2:])} is not divisible by {self.divisor} (2^(depth-1))"
            )
        skips = []
        for level, encode in enumerate(self.encoders):
            x = encode(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()  # the bottleneck
        for upsample, decode in zip(self.upsamplers, self.decoders, strict=True):
            x = decode(torch.cat([skips.pop(), upsample(x)], dim=1))
        return self.head(x)
