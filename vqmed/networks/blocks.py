"""MONAI-style building blocks shared by the vqmed VQ-VAEs (2D and 3D through ``spatial_dims``).

Speed comes from doing little work at full resolution: a strided/patchifying stem, narrow
high-resolution levels and sub-pixel (pixel-shuffle) upsampling in the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.utils import get_act_layer
from monai.networks.utils import pixelshuffle, pixelunshuffle
from torch import nn

__all__ = ["STEMS", "UPSAMPLES", "Decoder", "Downsample", "Encoder", "ResBlock", "Upsample", "he_init_"]

STEMS = ("conv", "patchify")
UPSAMPLES = ("pixelshuffle", "transpose")


def _space_to_depth(x: torch.Tensor, spatial_dims: int, factor: int) -> torch.Tensor:
    # torch's 2D kernel is faster and keeps channels_last; MONAI's generic one covers 3D
    return F.pixel_unshuffle(x, factor) if spatial_dims == 2 else pixelunshuffle(x, spatial_dims, factor)


def _depth_to_space(x: torch.Tensor, spatial_dims: int, factor: int) -> torch.Tensor:
    return F.pixel_shuffle(x, factor) if spatial_dims == 2 else pixelshuffle(x, spatial_dims, factor)


def _icnr_(weight: torch.Tensor, factor: int, spatial_dims: int) -> None:
    """ICNR init (Aitken et al. 2017): all sub-pixels of one output channel start with the same kernel,
    so a pixel-shuffle upsampler starts as nearest-neighbour upsampling (no checkerboard)."""
    sub = factor**spatial_dims
    out_ch, in_ch, *kernel = weight.shape
    base = torch.empty(out_ch // sub, in_ch, *kernel, dtype=weight.dtype, device=weight.device)
    nn.init.kaiming_uniform_(base, a=math.sqrt(5))  # PyTorch's default conv init
    with torch.no_grad():
        # channel c * sub + s of the conv output becomes sub-pixel s of output channel c after the shuffle
        weight.copy_(base.repeat_interleave(sub, dim=0))


def he_init_(module: nn.Module) -> nn.Module:
    """He (Kaiming-normal, ReLU gain) init of every convolution in ``module``, zero biases.

    Used for the encoders: PyTorch's default conv init shrinks the activation variance about six-fold per
    layer, so at initialisation the latents are nearly the same vector everywhere; the quantizer then maps
    almost everything to a few codes and the codebook collapses in the first steps. He init keeps an
    O(1) input-dependent signal in the latents.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class ResBlock(nn.Module):
    """
    Residual unit in the style of MONAI's ``VQVAEResidualUnit``: ``act(x + conv_1x1(act(conv_kxk(x))))``.
    The second convolution is 1x1 (as in van den Oord et al. 2017), and the hidden width can be narrower
    than the block width, which makes the unit cheap at high resolution.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        channels: number of input and output channels.
        hidden_channels: number of channels between the two convolutions.
        kernel_size: kernel size of the first convolution.
        act: activation type and arguments.
        norm: feature normalization type and arguments (``None`` for none).
        dropout: dropout ratio after the first convolution.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        act: tuple | str | None = "RELU",
        norm: tuple | str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = Convolution(
            spatial_dims,
            channels,
            hidden_channels,
            kernel_size=kernel_size,
            act=act,
            norm=norm,
            dropout=dropout or None,
            adn_ordering="NDA",
        )
        self.conv2 = Convolution(spatial_dims, hidden_channels, channels, kernel_size=1, conv_only=True)
        self.act = get_act_layer(act) if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv2(self.conv1(x)))


class Downsample(nn.Module):
    """
    Strided convolution that divides every spatial size by ``factor``.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        factor: downsampling factor (stride); 1 gives a plain 3x3 convolution.
        mode: ``"conv"``: overlapping kernel ``max(3, factor + 1)``; ``"patchify"``: non-overlapping
            kernel ``factor`` (space-to-depth followed by a 1x1 convolution, the cheapest option).
        act: activation after the convolution (``None`` for a linear layer).
        norm: feature normalization type and arguments (``None`` for none).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        factor: int = 2,
        mode: str = "conv",
        act: tuple | str | None = "RELU",
        norm: tuple | str | None = None,
    ) -> None:
        super().__init__()
        if mode not in STEMS:
            raise ValueError(f"mode must be one of {STEMS}, got {mode!r}")
        self.spatial_dims, self.factor = spatial_dims, factor
        self.patchify = mode == "patchify" and factor > 1
        if self.patchify:
            # space-to-depth + 1x1 conv == a kernel=stride conv, but the 1x1 conv is a plain GEMM
            self.conv = Convolution(
                spatial_dims,
                in_channels * factor**spatial_dims,
                out_channels,
                kernel_size=1,
                act=act,
                norm=norm,
                conv_only=act is None and norm is None,
            )
        else:
            kernel = max(3, factor + 1)
            self.conv = Convolution(
                spatial_dims,
                in_channels,
                out_channels,
                strides=factor,
                kernel_size=kernel,
                padding=kernel // 2,
                act=act,
                norm=norm,
                conv_only=act is None and norm is None,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patchify:
            x = _space_to_depth(x, self.spatial_dims, self.factor)
        return self.conv(x)


class Upsample(nn.Module):
    """
    Learned upsampling that multiplies every spatial size by ``factor``.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        factor: upsampling factor; 1 gives a plain 3x3 convolution.
        mode: ``"pixelshuffle"``: 3x3 convolution at the low resolution to ``out_channels * factor**dims``
            channels, then depth-to-space (ICNR-initialised, no checkerboard at start, all work at low
            resolution); ``"transpose"``: transposed convolution (kernel ``2 * factor``, MONAI style).
        act: activation after the upsampling (``None`` for a linear layer).
        norm: feature normalization type and arguments (``None`` for none).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        factor: int = 2,
        mode: str = "pixelshuffle",
        act: tuple | str | None = "RELU",
        norm: tuple | str | None = None,
    ) -> None:
        super().__init__()
        if mode not in UPSAMPLES:
            raise ValueError(f"mode must be one of {UPSAMPLES}, got {mode!r}")
        self.spatial_dims, self.factor = spatial_dims, factor
        self.shuffle = mode == "pixelshuffle" and factor > 1
        if factor == 1:
            self.conv = Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, conv_only=True)
        elif self.shuffle:
            self.conv = Convolution(
                spatial_dims, in_channels, out_channels * factor**spatial_dims, kernel_size=3, conv_only=True
            )
            _icnr_(self.conv.conv.weight, factor, spatial_dims)
        else:
            self.conv = Convolution(
                spatial_dims,
                in_channels,
                out_channels,
                strides=factor,
                kernel_size=2 * factor,
                padding=factor // 2,
                output_padding=0,
                is_transposed=True,
                conv_only=True,
            )
        post: list[nn.Module] = []
        if norm is not None:
            from monai.networks.layers.utils import get_norm_layer

            post.append(get_norm_layer(norm, spatial_dims=spatial_dims, channels=out_channels))
        if act is not None:
            post.append(get_act_layer(act))
        self.post = nn.Sequential(*post)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.shuffle:
            x = _depth_to_space(x, self.spatial_dims, self.factor)
        return self.post(x)


class Encoder(nn.Module):
    """
    VQ-VAE encoder: a stem that reduces the resolution by ``stem_stride``, then one level per entry of
    ``channels`` (each level after the first halves the resolution) with residual units, then a 1x1
    projection to ``out_channels``. Total downsampling is ``stem_stride * 2 ** (len(channels) - 1)``.
    Convolutions are He-initialised (see :func:`he_init_`).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: channels of the output (the embedding dim); ``None`` returns the last level's
            features without a projection.
        channels: channels of each level, finest first.
        num_res_layers: residual units per level.
        num_res_channels: hidden channels of the residual units per level.
        stem_stride: downsampling factor of the stem (1, 2, 4, ...).
        stem: ``"conv"`` or ``"patchify"`` (see :class:`Downsample`), used by the stem and level changes.
        act: activation type and arguments.
        norm: feature normalization type and arguments (``None`` for none).
        dropout: dropout ratio inside the residual units.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int | None,
        channels: Sequence[int],
        num_res_layers: Sequence[int],
        num_res_channels: Sequence[int],
        stem_stride: int,
        stem: str = "conv",
        act: tuple | str | None = "RELU",
        norm: tuple | str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            Downsample(spatial_dims, in_channels, channels[0], stem_stride, mode=stem, act=act, norm=norm)
        ]
        for i, ch in enumerate(channels):
            if i > 0:
                layers.append(Downsample(spatial_dims, channels[i - 1], ch, 2, mode=stem, act=act, norm=norm))
            for _ in range(num_res_layers[i]):
                layers.append(ResBlock(spatial_dims, ch, num_res_channels[i], act=act, norm=norm, dropout=dropout))
        if out_channels is not None:
            layers.append(Convolution(spatial_dims, channels[-1], out_channels, kernel_size=1, conv_only=True))
        self.blocks = nn.Sequential(*layers)
        he_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def stages(self) -> list[nn.Module]:
        """The blocks whose outputs are the encoder's intermediate features: the stem, every level change
        and every residual unit (not the final 1x1 projection, a linear map of the last stage)."""
        return [b for b in self.blocks if isinstance(b, (Downsample, ResBlock))]


class Decoder(nn.Module):
    """
    VQ-VAE decoder mirroring :class:`Encoder`: a 3x3 input convolution, residual units per level from
    the coarsest, a x2 upsampling between levels and a final upsampling by ``stem_stride`` to
    ``out_channels`` at full resolution, followed by the optional output activation.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: channels of the (quantized) latent.
        out_channels: channels of the output image.
        channels: channels of each level, finest first (as in the encoder).
        num_res_layers: residual units per level.
        num_res_channels: hidden channels of the residual units per level.
        stem_stride: upsampling factor of the last (full-resolution) layer.
        upsample: ``"pixelshuffle"`` or ``"transpose"`` (see :class:`Upsample`).
        act: activation type and arguments.
        norm: feature normalization type and arguments (``None`` for none).
        dropout: dropout ratio inside the residual units.
        output_act: activation of the output (e.g. ``"SIGMOID"``), ``None`` for a linear output.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        num_res_layers: Sequence[int],
        num_res_channels: Sequence[int],
        stem_stride: int,
        upsample: str = "pixelshuffle",
        act: tuple | str | None = "RELU",
        norm: tuple | str | None = None,
        dropout: float = 0.0,
        output_act: tuple | str | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            Convolution(spatial_dims, in_channels, channels[-1], kernel_size=3, act=act, norm=norm)
        ]
        for i in reversed(range(len(channels))):
            for _ in range(num_res_layers[i]):
                layers.append(
                    ResBlock(spatial_dims, channels[i], num_res_channels[i], act=act, norm=norm, dropout=dropout)
                )
            if i > 0:
                layers.append(
                    Upsample(spatial_dims, channels[i], channels[i - 1], 2, mode=upsample, act=act, norm=norm)
                )
        layers.append(Upsample(spatial_dims, channels[0], out_channels, stem_stride, mode=upsample, act=None))
        if output_act is not None:
            layers.append(get_act_layer(output_act))
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)
