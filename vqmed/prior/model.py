"""The prior's network: one MONAI ``DecoderOnlyTransformer`` per code level, in a fixed raster ordering.

MONAI has every part: ``DecoderOnlyTransformer`` (the network), ``Ordering`` (image <-> sequence) and
``VQVAETransformerInferer`` (the training forward with the begin-of-sequence token, ``sample`` with a
temperature and top-k, ``get_likelihood`` with the per-code log-likelihood map). What MONAI's inferer is
missing is a way in for code maps that are already exported: it calls ``vqvae_model.index_quantize(images)``
and ``vqvae_model.decode_samples(codes)`` itself. :class:`CodeMaps` stands in for the VQ-VAE there (the code
map passes through unchanged), so the store's codes go through MONAI's inferer as they are and the
VQ-VAE decodes them afterwards (``ExportStore.decode``).

Two-level models (VQ-VAE-2): each level gets its own transformer over its own raster, the bottom one
conditioned on nothing (not on the top codes); a study's likelihood is the product of both levels'
(the code lengths add), which is a proper distribution over (top, bottom) pairs. Samples draw the two
levels independently, so a two-level sample is less coherent than a one-level one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from monai.inferers import VQVAETransformerInferer
from monai.networks.nets import DecoderOnlyTransformer
from monai.utils.ordering import Ordering
from torch import nn

__all__ = ["CodeMaps", "Level", "PriorModel", "ordering_for"]

LN2 = math.log(2.0)
# The smallest probability a code is given when scoring: a float32 softmax can round a very unlikely code
# to 0 and MONAI's get_likelihood then returns log(0) = -inf; 2^-100 keeps a study's bits finite.
MIN_LOG_PROB = -100.0 * LN2


# MONAI's inferer holds no state; one instance kept outside the module (its __init__ skips nn.Module's, so it
# cannot be registered as a submodule).
INFERER = VQVAETransformerInferer()


class CodeMaps(nn.Module):
    """The VQ-VAE's place in MONAI's ``VQVAETransformerInferer`` when the code maps are already exported.

    Args:
        num_embeddings: codebook size K of the level; the begin-of-sequence token is K.
    """

    def __init__(self, num_embeddings: int) -> None:
        super().__init__()
        self.num_embeddings = int(num_embeddings)

    def index_quantize(self, codes: torch.Tensor) -> torch.Tensor:
        """The code map itself ``[N, *latent]`` (the inferer's "encoding" of an already encoded study)."""
        return codes.long()

    def decode_samples(self, codes: torch.Tensor) -> torch.Tensor:
        """The sampled code map itself; :meth:`vqmed.export.ExportStore.decode` makes images of it."""
        return codes


def ordering_for(shape: tuple[int, ...], ordering_type: str = "raster_scan") -> Ordering:
    """MONAI's ``Ordering`` of a 2D ``(H, W)`` or 3D ``(D, H, W)`` code map."""
    return Ordering(ordering_type=ordering_type, spatial_dims=len(shape), dimensions=(1, *shape))


@dataclass(frozen=True)
class Level:
    """One code level of the store.

    Args:
        array: the store array (``codes``, or ``codes_top`` for the top level of a VQ-VAE-2).
        shape: the code map's spatial shape.
        num_codes: codebook size K.
    """

    array: str
    shape: tuple[int, ...]
    num_codes: int

    @property
    def length(self) -> int:
        return int(math.prod(self.shape))


class PriorModel(nn.Module):
    """Autoregressive prior over a store's code maps: one MONAI ``DecoderOnlyTransformer`` per level.

    Args:
        levels: the store's code levels (``codes``; and ``codes_top`` for two-level models).
        attn_layers_dim: width of the attention layers.
        attn_layers_depth: transformer blocks.
        attn_layers_heads: attention heads.
        embedding_dropout_rate: dropout on the token + position embeddings (training only).
        ordering: MONAI ordering type (``raster_scan``; ``s_curve`` and ``random`` work too).
    """

    def __init__(self, levels: list[Level], attn_layers_dim: int, attn_layers_depth: int, attn_layers_heads: int,
                 embedding_dropout_rate: float = 0.0, ordering: str = "raster_scan") -> None:
        super().__init__()
        self.levels = list(levels)
        self.ordering_type = ordering
        self.config = {"attn_layers_dim": attn_layers_dim, "attn_layers_depth": attn_layers_depth,
                       "attn_layers_heads": attn_layers_heads, "embedding_dropout_rate": embedding_dropout_rate,
                       "ordering": ordering}
        self.nets = nn.ModuleDict({
            level.array: DecoderOnlyTransformer(
                num_tokens=level.num_codes + 1,  # + the begin-of-sequence token
                max_seq_len=level.length,  # the whole map in context: no sliding window
                attn_layers_dim=attn_layers_dim,
                attn_layers_depth=attn_layers_depth,
                attn_layers_heads=attn_layers_heads,
                embedding_dropout_rate=embedding_dropout_rate,
                use_flash_attention=True,  # torch's fused attention: ~25% faster on CPU too
            )
            for level in self.levels
        })
        self.adapters = {level.array: CodeMaps(level.num_codes) for level in self.levels}
        self.orderings = {level.array: ordering_for(level.shape, ordering) for level in self.levels}

    @property
    def total_codes(self) -> int:
        return sum(level.length for level in self.levels)

    def describe(self) -> dict[str, Any]:
        """What rebuilds the model: its config and levels (stored in the checkpoint)."""
        return {**self.config, "levels": [{"array": lv.array, "shape": list(lv.shape), "num_codes": lv.num_codes}
                                           for lv in self.levels]}

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> "PriorModel":
        levels = [Level(lv["array"], tuple(int(s) for s in lv["shape"]), int(lv["num_codes"]))
                  for lv in description["levels"]]
        kwargs = {k: v for k, v in description.items() if k != "levels"}
        return cls(levels, **kwargs)

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the description and every weight: the prior's id in score columns."""
        h = hashlib.sha256(repr(sorted(self.describe().items())).encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross-entropy in nats per code over every level (weighted by their code counts).

        Args:
            batch: ``{array: [B, *shape] code maps}`` for every level.

        Returns:
            ``(loss, {"nats/ARRAY": per-level mean})``.
        """
        total = 0.0
        parts: dict[str, torch.Tensor] = {}
        for level in self.levels:
            logits, target, _ = INFERER(batch[level.array], self.adapters[level.array], self.nets[level.array],
                                             self.orderings[level.array], return_latent=True)
            nats = nn.functional.cross_entropy(logits.transpose(1, 2), target.long())
            parts[f"nats/{level.array}"] = nats.detach()
            total = total + nats * (level.length / self.total_codes)
        return total, parts  # type: ignore[return-value]

    @torch.no_grad()
    def log_likelihood(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-code natural log-likelihood maps ``{array: [B, *shape]}`` (MONAI's ``get_likelihood``)."""
        out = {}
        for level in self.levels:
            ll = INFERER.get_likelihood(batch[level.array], self.adapters[level.array], self.nets[level.array],
                                             self.orderings[level.array])
            out[level.array] = ll.clamp_min(MIN_LOG_PROB)
        return out

    @torch.no_grad()
    def bits_per_code(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B]`` mean code length in bits over every code of every level."""
        maps = self.log_likelihood(batch)
        nats = sum(-m.flatten(1).sum(1) for m in maps.values())
        return nats / (self.total_codes * LN2)  # type: ignore[operator]

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, top_k: int | None = None, device: str | torch.device = "cpu",
               verbose: bool = False) -> dict[str, torch.Tensor]:
        """``n`` code maps per level drawn by MONAI's ``VQVAETransformerInferer.sample``."""
        out = {}
        for level in self.levels:
            start = torch.full((n, 1), level.num_codes, dtype=torch.long, device=device)
            out[level.array] = INFERER.sample(
                level.shape, start, self.adapters[level.array], self.nets[level.array], self.orderings[level.array],
                temperature=temperature, top_k=top_k, verbose=verbose,
            )
        return out
