"""Two-level hierarchical VQ-VAE-2 (Razavi et al. 2019), 2D/3D, with the same API as :class:`VQVAE`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

from vqmed.networks import _checks as C
from vqmed.networks.blocks import STEMS, UPSAMPLES, Decoder, Encoder, Upsample, he_init_
from vqmed.networks.quantizer import VectorQuantizer
from vqmed.networks.vqvae import encoder_levels

__all__ = ["VQVAE2"]

Pair = tuple[torch.Tensor, torch.Tensor]


class VQVAE2(nn.Module):
    """
    VQ-VAE-2 (Razavi et al. 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2"): a bottom code
    map at ``1 / downsample`` of the input and a coarser top code map at ``1 / (downsample * top_downsample)``.
    The top latent is computed from the bottom encoder features; the bottom latent is conditioned on the
    decoded top codes; the decoder sees both code maps. Every latent, index map and loss of the
    :class:`~vqmed.networks.vqvae.VQVAE` API becomes a ``(bottom, top)`` pair (losses are summed over
    the two levels under the same keys).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        channels: channels of each level of the bottom encoder/decoder, finest first.
        num_res_layers: residual units per bottom level (int or one per level).
        num_res_channels: hidden channels of the bottom residual units; ``None`` = ``channels``.
        downsample: downsampling factor of the bottom code map: 4, 8 or 16.
        top_downsample: extra downsampling of the top code map relative to the bottom: 2 or 4.
        top_channels: channels of the top encoder/decoder; ``None`` = ``channels[-1]``.
        top_num_res_layers: residual units of the top encoder and top decoder.
        num_embeddings: codebook size, one int for both levels or ``(bottom, top)``.
        embedding_dim: latent / code dimension D of both levels.
        stem: ``"patchify"`` or ``"conv"`` (see :class:`~vqmed.networks.vqvae.VQVAE`).
        upsample: ``"pixelshuffle"`` or ``"transpose"``.
        act: activation type and arguments (MONAI spec).
        norm: feature normalization type and arguments (MONAI spec), ``None`` for none.
        dropout: dropout ratio inside the residual units.
        output_act: activation of the reconstruction, ``None`` = linear.
        decay: EMA decay of both codebooks; ``None`` or 0 = learned codebooks.
        ema_warmup: ramp the EMA decay up from 0.1 over the first updates (see ``VectorQuantizer``).
        commitment_cost: weight of the commitment losses.
        epsilon: Laplace smoothing of the EMA cluster sizes.
        kmeans_init: k-means initialise the codebooks from the first training batch.
        kmeans_iters: k-means iterations.
        dead_code_threshold: minimum uses per step for a code to count as used.
        restart_after_steps: re-seed codes unused for this many training steps (``None``/0 = never).
        use_cosine: l2-normalised (cosine) codes.
        lookup_dim: low-dimensional factorised lookup dimension, ``None`` = ``embedding_dim``.
        sync_distributed: keep the codebooks identical across torch.distributed ranks.
    """

    levels: int = 2

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (128,),
        num_res_layers: int | Sequence[int] = 2,
        num_res_channels: int | Sequence[int] | None = 64,
        downsample: int = 4,
        top_downsample: int = 2,
        top_channels: int | None = None,
        top_num_res_layers: int = 1,
        num_embeddings: int | Sequence[int] = 512,
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
        self.top_downsample = C.check_downsample("top_downsample", top_downsample, (2, 4))
        chans, layers, res_chans, stem_stride = encoder_levels(
            "VQVAE2", channels, num_res_layers, num_res_channels, downsample
        )
        top_ch = chans[-1] if top_channels is None else C.check_int("top_channels", top_channels, 1)
        C.check_int("top_num_res_layers", top_num_res_layers, 0)
        k_bottom, k_top = C.per_level("num_embeddings", num_embeddings, 2, 2)
        C.check_int("embedding_dim", embedding_dim, 1)
        C.check_choice("stem", stem, STEMS)
        C.check_choice("upsample", upsample, UPSAMPLES)
        C.check_layer("act", act, "act")
        C.check_layer("norm", norm, "norm", spatial_dims)
        C.check_layer("output_act", output_act, "act")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        d = embedding_dim
        blocks = dict(act=act, norm=norm, dropout=dropout)

        self.encoder_bottom = Encoder(
            spatial_dims, in_channels, None, chans, layers, res_chans, stem_stride, stem=stem, **blocks
        )
        self.encoder_top = Encoder(
            spatial_dims, chans[-1], d, [top_ch], [top_num_res_layers], [top_ch], top_downsample, stem="conv", **blocks
        )
        # decodes the top codes to bottom resolution to condition the bottom latent (Razavi et al., Alg. 1)
        self.decoder_top = Decoder(
            spatial_dims,
            d,
            chans[-1],
            [top_ch],
            [top_num_res_layers],
            [top_ch],
            top_downsample,
            upsample=upsample,
            **blocks,
        )
        self.pre_quant_bottom = he_init_(Convolution(spatial_dims, 2 * chans[-1], d, kernel_size=1, conv_only=True))
        self.upsample_top = Upsample(spatial_dims, d, d, top_downsample, mode=upsample, act=None)
        self.decoder = Decoder(
            spatial_dims,
            2 * d,
            out_channels,
            chans,
            layers,
            res_chans,
            stem_stride,
            upsample=upsample,
            output_act=output_act,
            **blocks,
        )
        qargs = dict(
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
        self.quantizer_bottom = VectorQuantizer(k_bottom, d, **qargs)
        self.quantizer_top = VectorQuantizer(k_top, d, **qargs)

    @property
    def quantizers(self) -> list[VectorQuantizer]:
        """``[bottom, top]`` quantizers."""
        return [self.quantizer_bottom, self.quantizer_top]

    def feature_stages(self) -> list[nn.Module]:
        """Modules whose outputs are the encoder's intermediate features (stem, level changes, residual
        units), finest first: the export pools them and semantic objectives read them through hooks."""
        return self.encoder_bottom.stages()

    def latent_shape(self, input_size: int | Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Spatial shapes ``(bottom, top)`` of the code maps for an input of spatial size ``input_size``."""
        C.latent_size(input_size, self.spatial_dims, self.downsample * self.top_downsample)
        bottom = C.latent_size(input_size, self.spatial_dims, self.downsample)
        return bottom, tuple(s // self.top_downsample for s in bottom)

    def _bottom_latent(self, h: torch.Tensor, zq_top: torch.Tensor) -> torch.Tensor:
        return self.pre_quant_bottom(torch.cat([h, self.decoder_top(zq_top)], 1))

    def encode(self, x: torch.Tensor) -> Pair:
        """Continuous latents ``(z_bottom, z_top)``. ``z_bottom`` is conditioned on the top codes found by
        a pure lookup (no codebook update)."""
        C.check_input("VQVAE2", x, self.spatial_dims, self.in_channels, self.downsample * self.top_downsample)
        h = self.encoder_bottom(x)
        z_top = self.encoder_top(h)
        return self._bottom_latent(h, self.quantizer_top.lookup(z_top)[0]), z_top

    def quantize(self, z: Pair) -> tuple[Pair, Pair, dict[str, torch.Tensor]]:
        """``((zq_bottom, zq_top), (idx_bottom, idx_top), losses)``; updates the codebooks in training mode."""
        zq_b, idx_b, loss_b = self.quantizer_bottom(z[0])
        zq_t, idx_t, loss_t = self.quantizer_top(z[1])
        return (zq_b, zq_t), (idx_b, idx_t), {k: loss_b[k] + loss_t[k] for k in loss_b}

    def index_quantize(self, x: torch.Tensor) -> Pair:
        """Code index maps ``(bottom, top)`` (never changes the codebooks)."""
        z_b, z_t = self.encode(x)
        return self.quantizer_bottom.lookup(z_b)[1], self.quantizer_top.lookup(z_t)[1]

    def decode(self, z_q: Pair) -> torch.Tensor:
        """Reconstruction from quantized latents ``(zq_bottom, zq_top)``."""
        return self.decoder(torch.cat([z_q[0], self.upsample_top(z_q[1])], 1))

    def decode_indices(self, indices: Pair) -> torch.Tensor:
        """Reconstruction from code index maps ``(bottom, top)``."""
        return self.decode(
            (
                self.quantizer_bottom.get_codes_from_indices(indices[0]),
                self.quantizer_top.get_codes_from_indices(indices[1]),
            )
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], Pair]:
        """``(reconstruction, losses, (idx_bottom, idx_top))``; the top level is quantized once and its
        straight-through output conditions the bottom latent, as in the paper."""
        C.check_input("VQVAE2", x, self.spatial_dims, self.in_channels, self.downsample * self.top_downsample)
        h = self.encoder_bottom(x)
        zq_t, idx_t, loss_t = self.quantizer_top(self.encoder_top(h))
        zq_b, idx_b, loss_b = self.quantizer_bottom(self._bottom_latent(h, zq_t))
        losses = {k: loss_b[k] + loss_t[k] for k in loss_b}
        return self.decode((zq_b, zq_t)), losses, (idx_b, idx_t)
