"""Thin adapter giving MONAI's reference ``VQVAE`` the vqmed model API (the speed/quality baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import VQVAE as _MonaiNet
from torch import nn

from vqmed.networks import _checks as C

__all__ = ["MonaiVQVAE"]


class MonaiQuantizer(nn.Module):
    """
    Wraps MONAI's ``EMAQuantizer`` with the :class:`~vqmed.networks.quantizer.VectorQuantizer` API
    (``forward``/``lookup``/``get_codes_from_indices``/``codebook``/epoch statistics). The codebook
    update itself is MONAI's (EMA, no k-means init, no restarts).

    Args:
        quantizer: the MONAI ``EMAQuantizer`` of a ``monai.networks.nets.VQVAE``.
    """

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        # a plain reference, not a submodule: the MONAI net already owns it (no duplicate state_dict keys)
        self.__dict__["quantizer"] = quantizer
        self.num_embeddings = quantizer.num_embeddings
        self.embedding_dim = quantizer.embedding_dim
        self.register_buffer("usage", torch.zeros(self.num_embeddings, dtype=torch.long), persistent=False)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        z_q, loss, indices = self.quantizer(z)
        if self.training:
            self.usage.add_(torch.bincount(indices.reshape(-1), minlength=self.num_embeddings))
        return z_q, indices, {"commitment": loss, "codebook": torch.zeros((), device=z.device)}

    def lookup(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes with straight-through gradients, no codebook update."""
        _, _, indices = self.quantizer.quantize(z)
        q = self.quantizer.embed(indices)
        return z + (q - z).detach(), indices

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.quantizer.embed(indices.long())

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantizer.embedding.weight.detach()

    def reset_stats(self) -> None:
        self.usage.zero_()

    def stats(self) -> dict:
        counts = self.usage.cpu().clone()
        total = int(counts.sum())
        p = counts[counts > 0].double() / max(total, 1)
        return {
            "usage_counts": counts,
            "usage_fraction": float((counts > 0).double().mean()),
            "perplexity": float(torch.exp(-(p * p.log()).sum())) if total else 0.0,
            "restarts": 0,
            "vectors": total,
        }


class MonaiVQVAE(nn.Module):
    """
    ``monai.networks.nets.VQVAE`` behind the vqmed model API, used as the speed/quality baseline.
    Each level of ``channels`` downsamples by 2 with MONAI's (stride 2, kernel 4) convolutions, so
    ``downsample`` must equal ``2 ** len(channels)``. Defaults not named here are MONAI's own.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        channels: channels of each level.
        num_res_layers: residual units per level.
        num_res_channels: hidden channels of the residual units; ``None`` = ``channels``.
        downsample: total downsampling factor (``2 ** len(channels)``).
        num_embeddings: codebook size.
        embedding_dim: latent / code dimension.
        commitment_cost: weight of the commitment loss.
        decay: EMA decay of the codebook (MONAI's default 0.5).
        epsilon: Laplace smoothing epsilon.
        embedding_init: MONAI codebook init, ``"normal"`` or ``"kaiming_uniform"``.
        act: activation type and arguments.
        dropout: dropout ratio.
        output_act: activation of the reconstruction, ``None`` = linear.
        ddp_sync: MONAI's all-reduce of the EMA statistics under torch.distributed.
    """

    levels: int = 1

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (64, 128),
        num_res_layers: int = 2,
        num_res_channels: int | Sequence[int] | None = None,
        downsample: int = 4,
        num_embeddings: int = 512,
        embedding_dim: int = 64,
        commitment_cost: float = 0.25,
        decay: float = 0.5,
        epsilon: float = 1e-5,
        embedding_init: str = "normal",
        act: tuple | str | None = "RELU",
        dropout: float = 0.0,
        output_act: tuple | str | None = None,
        ddp_sync: bool = True,
    ) -> None:
        super().__init__()
        self.config = C.config_from_locals(locals())
        C.check_choice("spatial_dims", spatial_dims, (2, 3))
        C.check_int("in_channels", in_channels, 1)
        C.check_int("out_channels", out_channels, 1)
        chans = C.check_channels("channels", channels)
        res = C.per_level("num_res_channels", num_res_channels, len(chans), 1, default=chans)
        C.check_int("num_res_layers", num_res_layers, 0)
        self.downsample = C.check_downsample("downsample", downsample)
        if 2 ** len(chans) != downsample:
            raise ValueError(
                f"downsample={downsample} needs len(channels) == {downsample.bit_length() - 1} for MONAI's VQVAE, "
                f"got channels={chans}"
            )
        C.check_int("num_embeddings", num_embeddings, 2)
        C.check_int("embedding_dim", embedding_dim, 1)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        C.check_choice("embedding_init", embedding_init, ("normal", "kaiming_uniform"))
        C.check_layer("act", act, "act")
        C.check_layer("output_act", output_act, "act")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        n = len(chans)
        self.net = _MonaiNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=chans,
            num_res_layers=num_res_layers,
            num_res_channels=res,
            downsample_parameters=((2, 4, 1, 1),) * n,
            upsample_parameters=((2, 4, 1, 1, 0),) * n,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            embedding_init=embedding_init,
            commitment_cost=commitment_cost,
            decay=decay,
            epsilon=epsilon,
            dropout=dropout,
            act=act,
            output_act=output_act,
            ddp_sync=ddp_sync,
        )
        self.quantizer = MonaiQuantizer(self.net.quantizer.quantizer)

    @property
    def quantizers(self) -> list[MonaiQuantizer]:
        return [self.quantizer]

    def feature_stages(self) -> list[nn.Module]:
        """None: MONAI's encoder exposes no stage list (the export then stores no ``encoder_grid``)."""
        return []

    def latent_shape(self, input_size: int | Sequence[int]) -> tuple[int, ...]:
        return C.latent_size(input_size, self.spatial_dims, self.downsample)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        C.check_input("MonaiVQVAE", x, self.spatial_dims, self.in_channels, self.downsample)
        return self.net.encode(x)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return self.quantizer(z)

    def index_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.lookup(self.encode(x))[1]

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.net.decode(z_q)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantizer.get_codes_from_indices(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        z_q, indices, losses = self.quantize(self.encode(x))
        return self.decode(z_q), losses, indices
