"""3-D U-Net (Ronneberger/Cicek) returning logits, with options that make it cheap where the
voxels are many.

Input  (batch, in_channels, slices, height, width) = (B, 1, D, H, W) float.
Output (batch, num_classes, D, H, W) logits (no softmax); in training mode with
deep_supervision a list of them: full resolution first, then each coarser decoder level's.
Channels per level are base_channels * 2**level; the default (32, depth 5) is the seed's
32-64-128-256-512. `channels` (one width per level) sets them instead, e.g. 12-32-64-128:
wide where the voxels are few (MONAI's UNet `channels`, nnU-Net's features per stage).
Every size must be a multiple of size_multiple(depth, stem_stride).

Options (all off by default: the seed's shape):
- stem_stride (height, width, slices), e.g. (2, 2, 1): the first level's convolutions run at
  that reduced resolution (a strided first convolution, as MONAI's UNet and nnU-Net's plans
  do; 1 along an axis that is already coarse, such as 16 sagittal slices). Full-resolution
  detail comes back through a light path: one 3x3x3 convolution of the input with base / 2
  channels, concatenated with the transposed-convolution upsampling of the first level's
  output, mixed by a 1x1x1 convolution before the head. (A 3x3x3 convolution there cost
  nearly half of a training step on the CPU: its backward pass at full resolution.)
- residual: each block is a residual unit (conv-norm-act-conv-norm, plus the input through a
  1x1x1 projection where the width changes, then act), as nnU-Net's residual-encoder U-Net.
- deep_supervision: a 1x1x1 head on each decoder level below the top too; in training mode the
  forward returns all logits (steps.SegmentationLoss weighs them as nnU-Net does); in eval mode
  only the full-resolution ones.
- head_kernel = 3: the full-resolution head is a 3x3x3 convolution (padded) instead of 1x1x1,
  so each voxel's class sees its neighbours at full resolution, where the strided stem's
  light path otherwise mixes features voxel by voxel (MONAI's UNet ends on a 3x3x3
  convolution too). The deep-supervision heads stay 1x1x1.

ResidualUNet (`network = residual_unet`) is another shape: MONAI's UNet with residual units
(issue 18's peer), every level strided and a light decoder. make_network builds either from a
checkpoint's or a configuration's arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

NORMS = ("instance", "batch", "group")
NETWORKS = ("unet3d", "residual_unet")


def size_multiple(depth: int, stem_stride: tuple[int, int, int] = (1, 1, 1)) -> tuple[int, ...]:
    """What each input size (height, width, slices) must be a multiple of: the stem's stride
    times 2**(depth - 1) for the max-poolings."""
    return tuple(s * 2 ** (depth - 1) for s in stem_stride)


def checked_channels(depth: int, channels: Sequence[int] | None) -> list[int] | None:
    """A network's `channels` as ints, None when empty (() from ModelConfig: base_channels *
    2**level); ValueError unless depth >= 2 and there is one positive width per level."""
    if depth < 2:
        raise ValueError(f"depth {depth}: a U-Net needs at least 2 levels")
    channels = [int(c) for c in channels] if channels else None
    if channels is not None and (len(channels) != depth or min(channels) < 1):
        raise ValueError(f"channels {channels}: one positive width per level (depth {depth})")
    return channels


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


def conv_norm(
    in_channels: int, out_channels: int, norm: str, stride=1, kernel: int = 3
) -> list[nn.Module]:
    """kernel^3 convolution (stride: an int or per (D, H, W) axis; padded to keep the size
    at stride 1) and its norm."""
    return [
        Conv3d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        make_norm(norm, out_channels),
    ]


class ConvBlock(nn.Sequential):
    """(3x3x3 conv -> norm -> LeakyReLU) twice; keeps the spatial size, or reduces it by the
    first convolution's stride."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, stride=1) -> None:
        super().__init__(
            *conv_norm(in_channels, out_channels, norm, stride),
            nn.LeakyReLU(0.01, inplace=True),
            *conv_norm(out_channels, out_channels, norm),
            nn.LeakyReLU(0.01, inplace=True),
        )


class ResidualBlock(nn.Module):
    """act(conv-norm-act-conv-norm(x) + shortcut(x)); the shortcut is a strided 1x1x1
    projection where the width or the size changes, else the identity."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, stride=1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_norm(in_channels, out_channels, norm, stride),
            nn.LeakyReLU(0.01, inplace=True),
            *conv_norm(out_channels, out_channels, norm),
        )
        changes = in_channels != out_channels or stride not in (1, (1, 1, 1))
        self.shortcut = (
            nn.Sequential(*conv_norm(in_channels, out_channels, norm, stride, kernel=1))
            if changes
            else nn.Identity()
        )
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class UNet3D(nn.Module):
    """Encoder (blocks + 2x max-pooling), decoder (2x transposed conv, concatenated skip,
    block), 1x1x1 head; optionally a strided stem with a light full-resolution path, residual
    blocks, deep supervision and a 3x3x3 head (see the module docstring)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        base_channels: int = 32,
        depth: int = 5,
        norm: str = "instance",
        stem_stride: tuple[int, int, int] = (1, 1, 1),
        residual: bool = False,
        deep_supervision: bool = False,
        channels: Sequence[int] | None = None,
        head_kernel: int = 1,
    ) -> None:
        super().__init__()
        channels = checked_channels(depth, channels)
        if head_kernel not in (1, 3):
            raise ValueError(f"head_kernel {head_kernel}: 1 or 3")
        stem_stride = tuple(int(s) for s in stem_stride)
        if len(stem_stride) != 3 or any(s not in (1, 2) for s in stem_stride):
            raise ValueError(f"stem_stride {stem_stride}: three values of 1 or 2 (H, W, slices)")
        self.arguments = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "base_channels": base_channels,
            "depth": depth,
            "norm": norm,
            "stem_stride": list(stem_stride),
            "residual": residual,
            "deep_supervision": deep_supervision,
            "channels": channels,
            "head_kernel": head_kernel,
        }
        block = ResidualBlock if residual else ConvBlock
        widths = channels or [base_channels * 2**level for level in range(depth)]
        stride = (
            stem_stride[2],
            stem_stride[0],
            stem_stride[1],
        )  # tensor order (D, H, W)
        self.strided = stride != (1, 1, 1)
        self.encoders = nn.ModuleList(
            block(c_in, c_out, norm, stride if level == 0 else 1)
            for level, (c_in, c_out) in enumerate(
                zip([in_channels] + widths[:-1], widths, strict=True)
            )
        )
        self.pool = nn.MaxPool3d(2)
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2)
            for level in reversed(range(depth - 1))
        )
        self.decoders = nn.ModuleList(
            block(2 * widths[level], widths[level], norm) for level in reversed(range(depth - 1))
        )
        top = widths[0]
        if self.strided:  # the light full-resolution path
            top = max(widths[0] // 2, 1)
            self.full_resolution = nn.Sequential(
                *conv_norm(in_channels, top, norm), nn.LeakyReLU(0.01, inplace=True)
            )
            self.restore = nn.ConvTranspose3d(widths[0], top, stride, stride=stride)
            self.fuse = nn.Sequential(
                *conv_norm(2 * top, top, norm, kernel=1), nn.LeakyReLU(0.01, inplace=True)
            )
        self.head = nn.Conv3d(top, num_classes, head_kernel, padding=head_kernel // 2)
        # deep supervision: the decoder levels below the one the full-resolution head reads
        self.supervised = (
            list(range(0 if self.strided else 1, depth - 1)) if deep_supervision else []
        )
        self.deep_heads = nn.ModuleList(
            nn.Conv3d(widths[level], num_classes, 1) for level in self.supervised
        )

    @property
    def divisor(self) -> tuple[int, int, int]:
        """size_multiple of this network, in tensor order (slices, height, width)."""
        height, width, slices = size_multiple(
            self.arguments["depth"], self.arguments["stem_stride"]
        )
        return slices, height, width

    @property
    def supervision_centres(self) -> list[tuple[float, float, float]]:
        """For each deep-supervision output (coarsest last), where its first voxel's features
        are centred, in input voxels along (slices, height, width).

        The first convolution (3x3x3, padded, stride t) centres level 0's voxel i on input voxel
        t * i; each 2x max-pooling then centres a voxel between its two children. So level l's
        first voxel lies at t * (2^l - 1) / 2: a whole voxel with the strided stem (t = 2: 0,
        1, 3), half-way between two without it. With [training] deep_supervision_targets =
        centred, steps.resize_labels takes the coarse targets there."""
        stride = [self.arguments["stem_stride"][i] for i in (2, 0, 1)]  # tensor order
        return [tuple(t * (2**level - 1) / 2 for t in stride) for level in self.supervised]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if any(size % d for size, d in zip(x.shape[2:], self.divisor, strict=True)):
            raise ValueError(
                f"input grid {tuple(x.shape[2:])} (slices, height, width) is not divisible by "
                f"{self.divisor} (stem stride x 2^(depth-1))"
            )
        image = x
        skips = []
        for level, encode in enumerate(self.encoders):
            x = encode(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()  # the bottleneck
        decoded = {}  # decoder level -> its output
        for level, upsample, decode in zip(
            reversed(range(len(self.decoders))),
            self.upsamplers,
            self.decoders,
            strict=True,
        ):
            x = decode(torch.cat([skips.pop(), upsample(x)], dim=1))
            decoded[level] = x
        if self.strided:
            x = self.fuse(torch.cat([self.full_resolution(image), self.restore(x)], dim=1))
        logits = self.head(x)
        if not (self.training and self.supervised):
            return logits
        deep = [
            head(decoded[level])
            for level, head in zip(self.supervised, self.deep_heads, strict=True)
        ]
        return [logits, *deep]  # full resolution first, then coarser


def make_network(network: str = "unet3d", **arguments) -> nn.Module:
    """UNet3D or ResidualUNet from a checkpoint's or a configuration's model arguments."""
    if network == "unet3d":
        return UNet3D(**arguments)
    if network == "residual_unet":
        return ResidualUNet(**arguments)
    raise ValueError(f"network {network!r}: choose one of {', '.join(NETWORKS)}")


def conv_norm_prelu(
    in_channels: int, out_channels: int, norm: str, stride: int = 1, transposed: bool = False
) -> nn.Sequential:
    """3x3x3 convolution (transposed: doubles the size) with bias -> norm -> PReLU."""
    conv = (
        nn.ConvTranspose3d(in_channels, out_channels, 3, 2, padding=1, output_padding=1)
        if transposed
        else nn.Conv3d(in_channels, out_channels, 3, stride, padding=1)
    )
    return nn.Sequential(conv, make_norm(norm, out_channels), nn.PReLU())


class ResidualUnit(nn.Module):
    """MONAI's residual unit: `convs` x (3x3x3 conv -> norm -> PReLU), the first one strided,
    plus the input through a strided 3x3x3 convolution (1x1x1 where only the width changes,
    the identity where nothing does). last_conv_only: the last convolution has no norm and
    activation (the network's output)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str,
        stride: int = 1,
        convs: int = 2,
        last_conv_only: bool = False,
    ) -> None:
        super().__init__()
        units = [conv_norm_prelu(in_channels, out_channels, norm, stride)] + [
            conv_norm_prelu(out_channels, out_channels, norm) for _ in range(convs - 1)
        ]
        if last_conv_only:
            units[-1] = units[-1][0]
        self.body = nn.Sequential(*units)
        if stride != 1:
            self.shortcut = nn.Conv3d(in_channels, out_channels, 3, stride, padding=1)
        elif in_channels != out_channels:
            self.shortcut = nn.Conv3d(in_channels, out_channels, 1)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ResidualUNet(nn.Module):
    """MONAI's UNet with residual units (monai.networks.nets.UNet, strides 2, num_res_units=2),
    the MONAI peer's network of issue 18, built from torch alone.

    Input (B, in_channels, D, H, W), every size a multiple of 2**(depth - 1); output (B,
    num_classes, D, H, W) logits. Widths: `channels` (depth of them, e.g. 16-32-64-128-256) or
    base_channels * 2**level.
    - Encoder: a residual unit of two convolutions per level, the first strided by 2 on every
      axis (so no convolution runs at full resolution), then an unstrided one at the bottom.
    - Decoder, coarse to fine: the skip concatenated with what comes up, a 3x3x3 transposed
      convolution (stride 2) to the next finer level's width, one convolution more as a residual
      unit. The top one outputs the classes at full resolution.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        base_channels: int = 16,
        depth: int = 5,
        norm: str = "instance",
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        channels = checked_channels(depth, channels)
        self.arguments = {
            "network": "residual_unet",
            "in_channels": in_channels,
            "num_classes": num_classes,
            "base_channels": base_channels,
            "depth": depth,
            "norm": norm,
            "channels": channels,
        }
        widths = channels or [base_channels * 2**level for level in range(depth)]
        self.encoders = nn.ModuleList(
            ResidualUnit(c_in, c_out, norm, stride=2)
            for c_in, c_out in zip([in_channels] + widths[:-2], widths[:-1], strict=True)
        )
        self.bottom = ResidualUnit(widths[-2], widths[-1], norm)
        ups = []
        for level in reversed(range(depth - 1)):  # the decoder, coarse to fine
            c_in = widths[level] + (widths[level + 1] if level == depth - 2 else widths[level])
            c_out = widths[level - 1] if level else num_classes
            ups.append(
                nn.Sequential(
                    conv_norm_prelu(c_in, c_out, norm, transposed=True),
                    ResidualUnit(c_out, c_out, norm, convs=1, last_conv_only=level == 0),
                )
            )
        self.decoders = nn.ModuleList(ups)

    @property
    def supervision_centres(self) -> list[tuple[float, float, float]]:
        """Empty: this network has no deep-supervision outputs."""
        return []

    @property
    def divisor(self) -> tuple[int, int, int]:
        """What each input size (slices, height, width) must be a multiple of."""
        return (2 ** (self.arguments["depth"] - 1),) * 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(size % d for size, d in zip(x.shape[2:], self.divisor, strict=True)):
            raise ValueError(
                f"input grid {tuple(x.shape[2:])} (slices, height, width) is not divisible by "
                f"{self.divisor} (2^(depth-1))"
            )
        skips = []
        for encode in self.encoders:
            x = encode(x)
            skips.append(x)
        x = self.bottom(x)
        for decode in self.decoders:
            x = decode(torch.cat([skips.pop(), x], dim=1))
        return x
