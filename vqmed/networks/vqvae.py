"""Single-level VQ-VAE (2D/3D) built from MONAI blocks, tuned for few FLOPs at full resolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vqmed.networks import _checks as C
from vqmed.networks.blocks import STEMS, UPSAMPLES, Decoder, Encoder
from vqmed.networks.quantizer import VectorQuantizer

__all__ = ["VQVAE"]


def encoder_levels(
    name: str, channels: Sequence[int], num_res_layers, num_res_channels, downsample: int
) -> tuple[list[int], list[int], list[int], int]:
    """Validate the per-level settings and derive the stem stride (shared with :class:`VQVAE2`)."""
    channels = C.check_channels("channels", channels)
    n = len(channels)
    between = 2 ** (n - 1)  # every level after the first halves the resolution
    if between > downsample:
        raise ValueError(
            f"channels: {n} levels downsample by at least {between}, more than downsample={downsample}; "
            f"use at most {downsample.bit_length()} levels"
        )
    layers = C.per_level("num_res_layers", num_res_layers, n, 0)
    res_channels = C.per_level("num_res_channels", num_res_channels, n, 1, default=channels)
    return channels, layers, res_channels, downsample // between


class VQVAE(nn.Module):
    """
    Vector-quantised VAE (van den Oord et al. 2017) for 2D or 3D images, built from MONAI blocks.

    The encoder starts with a stem that reduces the resolution by ``downsample / 2 ** (len(channels) - 1)``
    (a strided or patchifying convolution, so little work is done at full resolution), then one level per
    entry of ``channels``. The decoder mirrors it with pixel-shuffle (or transposed-convolution) upsampling.
    Latents are quantized by a :class:`~vqmed.networks.quantizer.VectorQuantizer`.

    The defaults (a 4x4 patchifying stem straight to one 128-channel level at 1/4 resolution, two residual
    units with 64 hidden channels, a pixel-shuffle output layer) do about a fifth of the FLOPs of MONAI's
    ``VQVAE(channels=(64, 128), num_res_layers=2)`` at the same 1/4 latent grid.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        channels: channels of each resolution level, finest first (narrow early levels are cheap).
        num_res_layers: residual units per level (int or one per level).
        num_res_channels: hidden channels of the residual units (int or one per level); ``None`` = ``channels``.
        downsample: total downsampling factor of the latent grid: 4, 8 or 16.
        num_embeddings: codebook size K.
        embedding_dim: latent / code dimension D.
        stem: ``"patchify"`` (non-overlapping, cheapest) or ``"conv"`` (overlapping strided convolution);
            also used between levels.
        upsample: ``"pixelshuffle"`` (sub-pixel convolution, cheapest) or ``"transpose"``.
        act: activation type and arguments (MONAI spec).
        norm: feature normalization type and arguments (MONAI spec), ``None`` for none.
        dropout: dropout ratio inside the residual units.
        output_act: activation of the reconstruction (e.g. ``"SIGMOID"`` for [0, 1] images), ``None`` = linear.
        decay: EMA decay of the codebook; ``None`` or 0 = learned codebook with codebook loss.
        ema_warmup: ramp the EMA decay up from 0.1 over the first updates (see ``VectorQuantizer``).
        commitment_cost: weight of the commitment loss.
        epsilon: Laplace smoothing of the EMA cluster sizes.
        kmeans_init: k-means initialise the codebook from the first training batch.
        kmeans_iters: k-means iterations.
        dead_code_threshold: minimum uses per step for a code to count as used.
        restart_after_steps: re-seed codes unused for this many training steps (``None``/0 = never).
        use_cosine: l2-normalised (cosine) codes.
        lookup_dim: low-dimensional factorised lookup dimension, ``None`` = ``embedding_dim``.
        sync_distributed: keep the codebook identical across torch.distributed ranks.
    """

    levels: int = 1

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (128,),
        num_res_layers: int | Sequence[int] = 2,
        num_res_channels: int | Sequence[int] | None = 64,
        downsample: int = 4,
        num_embeddings: int = 512,
        embedding_dim: int = 64,
        stem: str = "patchify",
        upsample: str = "pixelshuffle",
        act: tuple | str | None = "RELU",
        norm: tuple | str | None = None,
        dropout: float = 0.0,
        output_act: tuple | str | None = None,
        decay: float | None = 0.99,
        ema_warmup: bool = True,
        commitment_cost: float = 0.25,
        epsilon: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 1.0,
        restart_after_steps: int | None = 10,
        use_cosine: bool = False,
        lookup_dim: int | None = None,
        sync_distributed: bool = True,
    ) -> None:
        # Long on purpose: one explicit, documented argument per option (MONAI's style); the body only validates
        # them and wires the blocks.
        super().__init__()
        self.config = C.config_from_locals(locals())
        C.check_choice("spatial_dims", spatial_dims, (2, 3))
        C.check_int("in_channels", in_channels, 1)
        C.check_int("out_channels", out_channels, 1)
        self.downsample = C.check_downsample("downsample", downsample)
        chans, layers, res_chans, stem_stride = encoder_levels(
            "VQVAE", channels, num_res_layers, num_res_channels, downsample
        )
        C.check_choice("stem", stem, STEMS)
        C.check_choice("upsample", upsample, UPSAMPLES)
        C.check_layer("act", act, "act")
        C.check_layer("norm", norm, "norm", spatial_dims)
        C.check_layer("output_act", output_act, "act")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels

        self.encoder = Encoder(
            spatial_dims,
            in_channels,
            embedding_dim,
            chans,
            layers,
            res_chans,
            stem_stride,
            stem=stem,
            act=act,
            norm=norm,
            dropout=dropout,
        )
        self.quantizer = VectorQuantizer(
            num_embeddings,
            embedding_dim,
            decay=decay,
            ema_warmup=ema_warmup,
            commitment_cost=commitment_cost,
            epsilon=epsilon,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            dead_code_threshold=dead_code_threshold,
            restart_after_steps=restart_after_steps,
            use_cosine=use_cosine,
            lookup_dim=lookup_dim,
            sync_distributed=sync_distributed,
        )
        self.decoder = Decoder(
            spatial_dims,
            embedding_dim,
            out_channels,
            chans,
            layers,
            res_chans,
            stem_stride,
            upsample=upsample,
            act=act,
            norm=norm,
            dropout=dropout,
            output_act=output_act,
        )

    @property
    def quantizers(self) -> list[VectorQuantizer]:
        """The model's quantizers (one)."""
        return [self.quantizer]

    def feature_stages(self) -> list[nn.Module]:
        """Modules whose outputs are the encoder's intermediate features (stem, level changes, residual
        units), finest first: the export pools them and semantic objectives read them through hooks."""
        return self.encoder.stages()

    def latent_shape(self, input_size: int | Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of the code map for an input of spatial size ``input_size``."""
        return C.latent_size(input_size, self.spatial_dims, self.downsample)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latents ``[B, D, *spatial / downsample]``."""
        C.check_input("VQVAE", x, self.spatial_dims, self.in_channels, self.downsample)
        return self.encoder(x)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(z_q, indices, losses)``; updates the codebook in training mode."""
        return self.quantizer(z)

    def index_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, *spatial / downsample]`` (never changes the codebook)."""
        return self.quantizer.lookup(self.encode(x))[1]

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Reconstruction from quantized latents."""
        return self.decoder(z_q)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Reconstruction from a code index map ``[B, *latent_spatial]``."""
        return self.decode(self.quantizer.get_codes_from_indices(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """``(reconstruction, losses, indices)``; ``losses`` holds the quantizer losses (``commitment``,
        ``codebook``), to be added to the reconstruction loss by the caller."""
        z_q, indices, losses = self.quantize(self.encode(x))
        return self.decode(z_q), losses, indices
