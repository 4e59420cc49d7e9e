"""ViT VQ-VAE (2D/3D): a transformer encoder and decoder around the VectorQuantizer, from MONAI blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.layers import trunc_normal_
from monai.networks.layers.utils import get_act_layer
from torch import nn

from vqmed.networks import _checks as C
from vqmed.networks.quantizer import VectorQuantizer

__all__ = ["ViTVQVAE"]

POS_EMBEDS = ("learnable", "sincos")


class GridTransformerBlock(nn.Module):
    """A MONAI ``TransformerBlock`` applied to a feature map ``[B, C, *grid]`` (the tokens are its cells in
    row-major order), so that its output is a spatial map like a convolutional stage's: the export pools
    it on a grid and objectives catch it through forward hooks.

    Args:
        block: the transformer block (``[B, N, C] -> [B, N, C]``), also called directly on token sequences.
    """

    def __init__(self, block: TransformerBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *grid = x.shape
        return self.block(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, *grid)


def _transformer(hidden: int, mlp: int, heads: int, dropout: float, qkv_bias: bool) -> TransformerBlock:
    # PyTorch's scaled_dot_product_attention instead of MONAI's einsum attention: same result, faster on CPU
    block = TransformerBlock(hidden, mlp, heads, dropout_rate=dropout, qkv_bias=qkv_bias, use_flash_attention=True)
    # MONAI builds the cross-attention LayerNorm even without cross-attention; its parameters would never get
    # a gradient, which DistributedDataParallel refuses (and they would sit in every checkpoint unused)
    block.norm_cross_attn = nn.Identity()
    return block


def _init_weights(m: nn.Module) -> None:
    # ViT / MAE initialisation: xavier-uniform linear layers with zero bias, unit LayerNorm
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ViTVQVAE(nn.Module):
    """
    VQ-VAE with a Vision Transformer encoder and decoder (ViT-VQGAN, Yu et al. 2022, "Vector-quantized Image
    Modeling with Improved VQGAN"), for 2D or 3D images, built from MONAI's ``PatchEmbeddingBlock`` and
    ``TransformerBlock``. The image is cut into non-overlapping ``patch_size`` patches, one token per patch;
    the encoder's tokens are projected to ``embedding_dim`` and quantized by the same
    :class:`~vqmed.networks.quantizer.VectorQuantizer` as :class:`~vqmed.networks.vqvae.VQVAE` (one code per
    patch, so the code map is ``img_size / patch_size``); the decoder maps the codes back to tokens and a
    linear patch-to-pixel head writes each token's ``patch_size`` patch. The head writes exactly the input
    size for any patch size (MONAI's ``ViTAutoEnc`` upsamples by a fixed 16, MONAI issue 6668).

    ``forward(x, hidden, mask_token)`` drops the hidden patches before the encoder (MAE, He et al. 2022):
    the encoder and the quantizer see only the visible tokens and the decoder gets ``mask_token`` in the
    hidden places, which is what the ``masked`` pretraining objective uses.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        img_size: the input's spatial size (int or one per axis); the model takes inputs of this size only
            (its position embeddings are per patch). Pretraining fills it from ``data.image_size``.
        patch_size: side of a patch (int or one per axis); it must divide ``img_size``. It is the model's
            downsampling factor: 4 gives a 16x16 code map for a 64x64 image, like ``vqvae``'s default.
        hidden_size: width of the encoder's tokens.
        mlp_dim: hidden width of the encoder's MLPs.
        num_layers: encoder transformer blocks.
        num_heads: attention heads of the encoder (must divide ``hidden_size``).
        decoder_hidden_size: width of the decoder's tokens; ``None`` = ``hidden_size``.
        decoder_mlp_dim: hidden width of the decoder's MLPs; ``None`` = ``mlp_dim``.
        decoder_num_layers: decoder transformer blocks; ``None`` = ``num_layers``.
        decoder_num_heads: attention heads of the decoder; ``None`` = ``num_heads``.
        pos_embed_type: ``"learnable"`` or ``"sincos"`` (fixed; ``hidden_size`` divisible by 4 in 2D, 6 in 3D)
            position embeddings of the encoder and the decoder.
        dropout_rate: dropout inside the transformer blocks.
        qkv_bias: bias in the attention's query/key/value projection.
        output_act: activation of the reconstruction (e.g. ``"SIGMOID"``), ``None`` = linear.
        num_embeddings: codebook size K.
        embedding_dim: latent / code dimension D.
        decay: EMA decay of the codebook; ``None`` or 0 = learned codebook with codebook loss.
        ema_warmup: ramp the EMA decay up from 0.1 over the first updates (see ``VectorQuantizer``).
        commitment_cost: weight of the commitment loss.
        epsilon: Laplace smoothing of the EMA cluster sizes.
        kmeans_init: k-means initialise the codebook from the first training batch.
        kmeans_iters: k-means iterations.
        dead_code_threshold: minimum uses per step for a code to count as used.
        restart_after_steps: re-seed codes unused for this many training steps (``None``/0 = never).
        use_cosine: l2-normalised (cosine) codes, as in ViT-VQGAN.
        lookup_dim: low-dimensional factorised lookup dimension (ViT-VQGAN: 32), ``None`` = ``embedding_dim``.
        sync_distributed: keep the codebook identical across torch.distributed ranks.
    """

    levels: int = 1
    #: ``forward`` can drop hidden patches from the encoder (read by the ``masked`` objective).
    drops_hidden_patches: bool = True

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        img_size: int | Sequence[int] = 64,
        patch_size: int | Sequence[int] = 4,
        hidden_size: int = 128,
        mlp_dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        decoder_hidden_size: int | None = None,
        decoder_mlp_dim: int | None = None,
        decoder_num_layers: int | None = None,
        decoder_num_heads: int | None = None,
        pos_embed_type: str = "learnable",
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
        output_act: tuple | str | None = None,
        num_embeddings: int = 512,
        embedding_dim: int = 32,
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
        self.img_size = tuple(C.per_level("img_size", img_size, spatial_dims, 1))
        self.patch_size = tuple(C.per_level("patch_size", patch_size, spatial_dims, 1))
        bad = [(s, p) for s, p in zip(self.img_size, self.patch_size) if s % p]
        if bad:
            raise ValueError(f"patch_size {self.patch_size} must divide img_size {self.img_size}")
        enc = [C.check_int(k, v, 1) for k, v in
               (("hidden_size", hidden_size), ("mlp_dim", mlp_dim), ("num_layers", num_layers), ("num_heads", num_heads))]
        dec_args = (decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads)
        names = ("decoder_hidden_size", "decoder_mlp_dim", "decoder_num_layers", "decoder_num_heads")
        dec = [e if v is None else C.check_int(k, v, 1) for k, v, e in zip(names, dec_args, enc)]
        for width, heads, key in ((enc[0], enc[3], ""), (dec[0], dec[3], "decoder_")):
            if width % heads:
                raise ValueError(f"{key}hidden_size {width} must be divisible by {key}num_heads {heads}")
        C.check_choice("pos_embed_type", pos_embed_type, POS_EMBEDS)
        if pos_embed_type == "sincos":
            for width, key in ((enc[0], "hidden_size"), (dec[0], "decoder_hidden_size")):
                if width % (2 * spatial_dims):
                    raise ValueError(f"pos_embed_type 'sincos' needs {key} divisible by {2 * spatial_dims}, got {width}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
        C.check_layer("output_act", output_act, "act")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        n_tokens = int(torch.tensor(self.grid).prod())
        # the masked objective's default patch and the checks shared with the conv models read this
        self.downsample = self.patch_size[0] if len(set(self.patch_size)) == 1 else None
        self.decoder_hidden_size = dec[0]

        self.patch_embedding = PatchEmbeddingBlock(
            in_channels, self.img_size, self.patch_size, enc[0], enc[3], proj_type="conv",
            pos_embed_type=pos_embed_type, dropout_rate=dropout_rate, spatial_dims=spatial_dims,
        )
        self.encoder_blocks = nn.ModuleList(
            GridTransformerBlock(_transformer(enc[0], enc[1], enc[3], dropout_rate, qkv_bias)) for _ in range(enc[2])
        )
        self.encoder_norm = nn.LayerNorm(enc[0])
        self.pre_quant = nn.Linear(enc[0], embedding_dim)
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
        self.post_quant = nn.Linear(embedding_dim, dec[0])
        if pos_embed_type == "sincos":
            self.decoder_pos_embed = build_sincos_position_embedding(list(self.grid), dec[0], spatial_dims)
        else:
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dec[0]))
        self.decoder_blocks = nn.ModuleList(
            _transformer(dec[0], dec[1], dec[3], dropout_rate, qkv_bias) for _ in range(dec[2])
        )
        self.decoder_norm = nn.LayerNorm(dec[0])
        patch_voxels = int(torch.tensor(self.patch_size).prod())
        self.head = nn.Linear(dec[0], out_channels * patch_voxels)
        self.output_act = get_act_layer(output_act) if output_act is not None else nn.Identity()
        for module in (self.encoder_blocks, self.encoder_norm, self.pre_quant, self.post_quant,
                       self.decoder_blocks, self.decoder_norm, self.head):
            module.apply(_init_weights)
        if pos_embed_type == "learnable":
            trunc_normal_(self.decoder_pos_embed, mean=0.0, std=0.02, a=-2.0, b=2.0)

    @property
    def quantizers(self) -> list[VectorQuantizer]:
        """The model's quantizers (one)."""
        return [self.quantizer]

    def feature_stages(self) -> list[nn.Module]:
        """The encoder's transformer blocks, first to last; each outputs a ``[B, hidden, *grid]`` map: the
        export pools them and semantic objectives read them through hooks."""
        return list(self.encoder_blocks)

    def latent_shape(self, input_size: int | Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of the code map for an input of spatial size ``input_size`` (must be ``img_size``)."""
        size = tuple(C.per_level("input_size", input_size, self.spatial_dims, 1))
        if size != self.img_size:
            raise ValueError(f"ViTVQVAE: built for img_size {self.img_size}, got input size {size}")
        return self.grid

    def _check(self, x: torch.Tensor) -> None:
        C.check_input("ViTVQVAE", x, self.spatial_dims, self.in_channels, 1)
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"ViTVQVAE: built for img_size {self.img_size}, got spatial size {tuple(x.shape[2:])} "
                f"(resize the input or build the model with this img_size)"
            )

    def _to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latents ``[B, D, *grid]`` (one per patch)."""
        self._check(x)
        h = self._to_grid(self.patch_embedding(x))
        for block in self.encoder_blocks:
            h = block(h)
        return self._to_grid(self.pre_quant(self.encoder_norm(h.flatten(2).transpose(1, 2))))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(z_q, indices, losses)``; updates the codebook in training mode."""
        return self.quantizer(z)

    def index_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, *grid]`` (never changes the codebook)."""
        return self.quantizer.lookup(self.encode(x))[1]

    def _decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decoder tokens ``[B, N, decoder_hidden]`` (position embedding not yet added) -> image."""
        h = tokens + self.decoder_pos_embed
        for block in self.decoder_blocks:
            h = block(h)
        return self.output_act(self.unpatchify(self.head(self.decoder_norm(h))))

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, N, C_out * prod(patch_size)]`` (channel-major, then the patch's voxels row-major)
        -> image ``[B, C_out, *img_size]``: token ``i`` fills the ``i``-th patch in the patch embedding's order."""
        # [B, *grid, C, *patch] -> [B, C, grid_0, patch_0, grid_1, patch_1, ...] -> [B, C, *img_size]
        d = self.spatial_dims
        patches = patches.reshape(patches.shape[0], *self.grid, self.out_channels, *self.patch_size)
        order = [0, d + 1] + [i for a in range(d) for i in (1 + a, d + 2 + a)]
        return patches.permute(order).reshape(patches.shape[0], self.out_channels, *self.img_size)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Reconstruction from quantized latents ``[B, D, *grid]``."""
        return self._decode_tokens(self.post_quant(z_q.flatten(2).transpose(1, 2)))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Reconstruction from a code index map ``[B, *grid]``."""
        return self.decode(self.quantizer.get_codes_from_indices(indices))

    def forward(
        self, x: torch.Tensor, hidden: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """``(reconstruction, losses, indices)``; ``losses`` holds the quantizer losses (``commitment``,
        ``codebook``), to be added to the reconstruction loss by the caller.

        Args:
            x: images ``[B, C, *img_size]``.
            hidden: optional boolean ``[B, *grid]``, True for patches the encoder must not see (the same
                number in every image). They are dropped before the first transformer block, so the encoder
                and the quantizer work on the visible tokens only; ``indices`` is then ``[B, visible]``.
            mask_token: the decoder's token for a hidden patch, ``[decoder_hidden_size]`` (needed with
                ``hidden``; a trainable parameter of the caller, e.g. the masked objective).
        """
        if hidden is None:
            z_q, indices, losses = self.quantize(self.encode(x))
            return self.decode(z_q), losses, indices
        self._check(x)
        b = x.shape[0]
        hidden = hidden.reshape(b, -1)
        if hidden.shape[1] != len(self.decoder_pos_embed[0]) or hidden.dtype != torch.bool:
            raise ValueError(f"ViTVQVAE: hidden must be a bool mask [B, {', '.join(map(str, self.grid))}]")
        if mask_token is None or mask_token.shape != (self.decoder_hidden_size,):
            raise ValueError(f"ViTVQVAE: hidden patches need a mask_token of shape [{self.decoder_hidden_size}]")
        n_visible = (~hidden).sum(1)
        if bool((n_visible != n_visible[0]).any()) or int(n_visible[0]) == 0:
            raise ValueError("ViTVQVAE: every image needs the same, non-zero number of visible patches")
        # positions of the visible tokens, in order: stable argsort puts False (visible) first
        keep = hidden.to(torch.uint8).argsort(dim=1, stable=True)[:, : int(n_visible[0])]
        tokens = self.patch_embedding(x)
        h = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
        for block in self.encoder_blocks:
            h = block.block(h)
        z = self.pre_quant(self.encoder_norm(h))  # [B, visible, D]
        z_q, indices, losses = self.quantize(z.transpose(1, 2))
        visible = self.post_quant(z_q.transpose(1, 2))
        full = mask_token.to(visible.dtype).expand(b, hidden.shape[1], -1)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, visible.shape[2]), visible)
        return self._decode_tokens(full), losses, indices
