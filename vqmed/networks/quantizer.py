"""Vector quantizer with EMA or learned codebook, k-means init, dead-code restart and DDP sync."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vqmed.networks._checks import check_int as _check_int

__all__ = ["VectorQuantizer"]

_CHUNK = 65536  # rows per distance matrix block: bounds memory for large 3D latents


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _nearest(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code per row: argmin |x|^2 - 2 x.e + |e|^2 as one matrix product per block."""
    e_sq = codes.pow(2).sum(1)
    out = []
    for block in x.split(_CHUNK):
        d = torch.addmm(e_sq.unsqueeze(0), block, codes.t(), alpha=-2.0) + block.pow(2).sum(1, keepdim=True)
        out.append(d.argmin(1))
    return torch.cat(out) if len(out) != 1 else out[0]


def _kmeans(samples: torch.Tensor, k: int, iters: int, cosine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means; empty clusters keep their previous centre. Returns (centres [k, d], sizes [k])."""
    n = samples.shape[0]
    if n >= k:
        centres = samples[torch.randperm(n, device=samples.device)[:k]].clone()
    else:
        # fewer vectors than codes: duplicate with a little noise so the codes are distinct
        centres = samples[torch.randint(n, (k,), device=samples.device)].clone()
        centres += 1e-3 * samples.std().clamp_min(1e-6) * torch.randn_like(centres)
    sizes = torch.zeros(k, device=samples.device)
    for _ in range(max(iters, 1)):
        assign = _nearest(samples, centres)
        sizes = torch.bincount(assign, minlength=k).to(samples.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, samples)
        new = sums / sizes.clamp_min(1.0).unsqueeze(1)
        if cosine:
            new = F.normalize(new, dim=1)
        centres = torch.where((sizes > 0).unsqueeze(1), new, centres)
    return centres, sizes


class VectorQuantizer(nn.Module):
    """
    Vector quantizer (van den Oord et al. 2017) for latents of shape ``[B, D, *spatial]``.

    Each latent vector is replaced by its nearest codebook vector (found with one matrix product in
    fp32, also under autocast); gradients pass straight through to the encoder. The codebook is either
    an exponential moving average of the assigned vectors with Laplace smoothing, or a learned parameter
    trained by the ``"codebook"`` loss. In training mode only, the codebook is k-means initialised from
    the first batch and codes unused for ``restart_after_steps`` steps are re-seeded from current encoder
    outputs. ``eval()`` never changes any buffer or parameter. Under ``torch.distributed`` the statistics
    are all-reduced and the k-means / restart samples all-gathered and broadcast, so every rank keeps a
    bit-identical codebook (the quantizer does this itself; no DDP buffer broadcast needed).

    Args:
        num_embeddings: number of codes K.
        embedding_dim: channels D of the latents.
        decay: EMA decay of the codebook statistics; ``None`` or 0 gives a learned codebook trained by
            the codebook loss.
        ema_warmup: use ``min(decay, (1 + t) / (10 + t))`` at EMA step ``t`` (TensorFlow's ``num_updates``
            rule) so that early in training the codebook keeps up with the fast-moving encoder instead of
            being left behind (which leaves all but a few codes dead).
        commitment_cost: weight beta of the commitment loss ``|z - sg(e)|^2``.
        epsilon: Laplace smoothing of the EMA cluster sizes.
        kmeans_init: initialise the codebook by k-means on the first training batch (all ranks).
        kmeans_iters: Lloyd iterations of the k-means init.
        kmeans_max_samples: at most this many vectors (over all ranks) are used by the k-means init.
        dead_code_threshold: a code counts as used in a step if it was chosen at least this many times
            (summed over ranks).
        restart_after_steps: re-seed a code not used for this many consecutive training steps with a
            random current encoder output; ``None`` or 0 disables restarts.
        use_cosine: l2-normalise latents and codes (cosine-similarity lookup, Yu et al. 2022).
        lookup_dim: if set, latents are linearly projected to this dimension for the lookup and the code
            is projected back (factorised codes, ViT-VQGAN); ``None`` looks up in D dimensions.
        sync_distributed: keep the codebook in sync across ranks when torch.distributed is initialised.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        decay: float | None = 0.99,
        ema_warmup: bool = True,
        commitment_cost: float = 0.25,
        epsilon: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        kmeans_max_samples: int = 65536,
        dead_code_threshold: float = 1.0,
        restart_after_steps: int | None = 10,
        use_cosine: bool = False,
        lookup_dim: int | None = None,
        sync_distributed: bool = True,
    ) -> None:
        super().__init__()
        _check_int("num_embeddings", num_embeddings, 2)
        _check_int("embedding_dim", embedding_dim, 1)
        if decay is not None and not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1) or None, got {decay!r}")
        if commitment_cost < 0:
            raise ValueError(f"commitment_cost must be >= 0, got {commitment_cost!r}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        _check_int("kmeans_iters", kmeans_iters, 1)
        _check_int("kmeans_max_samples", kmeans_max_samples, 1)
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold!r}")
        if restart_after_steps is not None:
            _check_int("restart_after_steps", restart_after_steps, 0)
        if lookup_dim is not None:
            _check_int("lookup_dim", lookup_dim, 1)

        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.decay = float(decay) if decay else 0.0
        self.use_ema = self.decay > 0.0
        self.ema_warmup = ema_warmup
        self.commitment_cost = float(commitment_cost)
        self.epsilon = float(epsilon)
        self.kmeans_iters = kmeans_iters
        self.kmeans_max_samples = kmeans_max_samples
        self.dead_code_threshold = float(dead_code_threshold)
        self.restart_after_steps = restart_after_steps or 0
        self.use_cosine = use_cosine
        self.lookup_dim = lookup_dim or embedding_dim
        self.sync_distributed = sync_distributed

        if lookup_dim is not None:
            self.project_in: nn.Module = nn.Linear(embedding_dim, lookup_dim)
            self.project_out: nn.Module = nn.Linear(lookup_dim, embedding_dim)
        else:
            self.project_in = self.project_out = nn.Identity()

        embed = torch.randn(num_embeddings, self.lookup_dim)
        if use_cosine:
            embed = F.normalize(embed, dim=1)
        if self.use_ema:
            self.register_buffer("embed", embed)
            # every code starts as its own single observation, so the first EMA steps are weighted averages
            self.register_buffer("ema_cluster_size", torch.ones(num_embeddings))
            self.register_buffer("ema_embed_sum", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("unused_steps", torch.zeros(num_embeddings, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training updates since init
        # epoch statistics: not part of a checkpoint
        self.register_buffer("usage", torch.zeros(num_embeddings, dtype=torch.long), persistent=False)
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long), persistent=False)

    # ----------------------------------------------------------------- lookup
    def _codes(self) -> torch.Tensor:
        embed = self.embed.float()
        return F.normalize(embed, dim=1) if self.use_cosine else embed

    def _to_lookup(self, z: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if z.ndim < 3 or z.shape[1] != self.embedding_dim:
            raise ValueError(
                f"VectorQuantizer expects latents [B, {self.embedding_dim}, *spatial], got shape {tuple(z.shape)}"
            )
        shape = (z.shape[0],) + tuple(z.shape[2:])
        x = self.project_in(z.float().movedim(1, -1).reshape(-1, self.embedding_dim))
        return (F.normalize(x, dim=1) if self.use_cosine else x), shape

    def _from_lookup(self, x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.project_out(x).reshape(*shape, self.embedding_dim).movedim(-1, 1).to(dtype)

    def lookup(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-code lookup with straight-through gradients and no codebook update or statistics.

        Args:
            z: latents ``[B, D, *spatial]``.

        Returns:
            ``(z_q, indices)`` with ``z_q`` shaped like ``z`` and ``indices`` ``[B, *spatial]``.
        """
        with torch.autocast(z.device.type, enabled=False):
            x, shape = self._to_lookup(z)
            codes = self._codes()
            idx = _nearest(x.detach(), codes.detach())
            q = F.embedding(idx, codes)
            # Straight-through estimator only where a gradient can flow; otherwise the exact code vectors,
            # so a no-grad forward reconstructs bit-identically to decode_indices(index_quantize(x)).
            z_q = self._from_lookup(x + (q - x).detach() if x.requires_grad else q, shape, z.dtype)
        return z_q, idx.reshape(shape)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantize ``z``; in training mode also update the codebook and the epoch statistics.

        Args:
            z: latents ``[B, D, *spatial]`` (any float dtype; the lookup runs in fp32).

        Returns:
            ``(z_q, indices, losses)``: ``z_q`` shaped like ``z`` with straight-through gradients,
            ``indices`` ``[B, *spatial]`` (int64), ``losses`` with ``"commitment"`` (already weighted by
            ``commitment_cost``) and ``"codebook"`` (0 for an EMA codebook).
        """
        with torch.autocast(z.device.type, enabled=False):
            x, shape = self._to_lookup(z)
            if self.training and not bool(self.initialized):
                self._kmeans_init(x.detach())
            codes = self._codes()
            idx = _nearest(x.detach(), codes.detach())
            q = F.embedding(idx, codes)
            losses = {"commitment": self.commitment_cost * F.mse_loss(x, q.detach())}
            if self.use_ema:
                losses["codebook"] = torch.zeros((), device=z.device)
            else:
                losses["codebook"] = F.mse_loss(q, x.detach())
            if self.training:
                with torch.no_grad():
                    self._update(x.detach(), idx)
            # Straight-through estimator only where a gradient can flow; otherwise the exact code vectors,
            # so a no-grad forward reconstructs bit-identically to decode_indices(index_quantize(x)).
            z_q = self._from_lookup(x + (q - x).detach() if x.requires_grad else q, shape, z.dtype)
        return z_q, idx.reshape(shape), losses

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for an index map.

        Args:
            indices: integer tensor ``[B, *spatial]`` with values in ``[0, num_embeddings)``.

        Returns:
            ``[B, D, *spatial]`` latents (in the model's latent space) ready for the decoder.
        """
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_embeddings):
            raise ValueError(
                f"indices must lie in [0, {self.num_embeddings}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        with torch.autocast(indices.device.type, enabled=False):
            q = F.embedding(indices.reshape(-1).long(), self._codes())
            return self._from_lookup(q, tuple(indices.shape), torch.float32)

    @property
    def codebook(self) -> torch.Tensor:
        """The K codes in the model's latent space, ``[K, D]`` (detached)."""
        with torch.no_grad():
            return self.project_out(self._codes()).detach()

    # ----------------------------------------------------------------- training updates
    def _distributed(self) -> bool:
        return self.sync_distributed and _dist_world() > 1

    def _update(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        k = self.num_embeddings
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        if self.use_ema:
            # one all-reduce for counts and sums together
            stats = torch.cat([counts.unsqueeze(1), torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, x)], 1)
            if self._distributed():
                dist.all_reduce(stats)
            counts, sums = stats[:, 0], stats[:, 1:]
            decay = self.decay
            if self.ema_warmup:
                t = float(self.steps)
                decay = min(decay, (1.0 + t) / (10.0 + t))
            self.ema_cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
            self.ema_embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
            n = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + self.epsilon) / (n + k * self.epsilon) * n
            new = self.ema_embed_sum / smoothed.unsqueeze(1)
            self.embed.copy_(F.normalize(new, dim=1) if self.use_cosine else new)
        elif self._distributed():
            dist.all_reduce(counts)
        self.steps.add_(1)
        self.usage.add_(counts.round().long())
        used = counts >= max(self.dead_code_threshold, 1e-12)
        self.unused_steps.add_(1).masked_fill_(used, 0)
        if self.restart_after_steps:
            dead = self.unused_steps >= self.restart_after_steps
            if bool(dead.any()):
                self._restart(dead, x)

    def _restart(self, dead: torch.Tensor, x: torch.Tensor) -> None:
        """Re-seed the ``dead`` codes with random current encoder outputs (gathered from all ranks)."""
        m = int(dead.sum())
        pick = (
            torch.randperm(x.shape[0], device=x.device)[:m]
            if x.shape[0] >= m
            else torch.randint(x.shape[0], (m,), device=x.device)
        )
        new = x[pick]
        if self._distributed():
            # dead is identical on every rank (from all-reduced counts), so m is too
            gathered = [torch.empty_like(new) for _ in range(_dist_world())]
            dist.all_gather(gathered, new.contiguous())
            stacked = torch.stack(gathered)  # [world, m, d]
            j = torch.arange(m, device=x.device)
            new = stacked[j % len(gathered), j]  # interleave ranks
        self.embed.data[dead] = new.to(self.embed.dtype)
        if self.use_ema:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new
        self.unused_steps[dead] = 0
        self.restarts.add_(m)

    def _kmeans_init(self, x: torch.Tensor) -> None:
        """Initialise the codebook with k-means on this batch (on all ranks' vectors under DDP)."""
        samples = x
        if self._distributed():
            world = _dist_world()
            n = torch.tensor([min(x.shape[0], self.kmeans_max_samples // world)], device=x.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            local = x[torch.randperm(x.shape[0], device=x.device)[: int(n)]].contiguous()
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local)
            samples = torch.cat(gathered)
        elif x.shape[0] > self.kmeans_max_samples:
            samples = x[torch.randperm(x.shape[0], device=x.device)[: self.kmeans_max_samples]]
        centres, sizes = _kmeans(samples, self.num_embeddings, self.kmeans_iters, self.use_cosine)
        if self._distributed():
            # k-means ran on identical data but with each rank's own random start: rank 0 decides
            dist.broadcast(centres, 0)
            dist.broadcast(sizes, 0)
        self.embed.data.copy_(centres)
        if self.use_ema:
            # empty clusters get weight 1 so they keep their centre instead of drifting to the origin
            sizes = sizes.clamp_min(1.0)
            self.ema_cluster_size.copy_(sizes)
            self.ema_embed_sum.copy_(centres * sizes.unsqueeze(1))
        self.initialized.fill_(True)

    # ----------------------------------------------------------------- epoch statistics
    def reset_stats(self) -> None:
        """Start a new accumulation period (e.g. an epoch) for :meth:`stats`."""
        self.usage.zero_()
        self.restarts.zero_()

    def stats(self) -> dict:
        """Code usage over all training forwards since :meth:`reset_stats` (summed over ranks).

        Returns:
            dict with ``usage_counts`` (int64 tensor ``[K]``), ``usage_fraction`` (share of codes used at
            least once), ``perplexity`` (exp of the entropy of the usage distribution), ``restarts``
            (codes re-seeded) and ``vectors`` (vectors quantized).
        """
        counts = self.usage.detach().cpu().clone()
        total = int(counts.sum())
        if total == 0:
            perplexity = 0.0
        else:
            p = counts[counts > 0].double() / total
            perplexity = float(torch.exp(-(p * p.log()).sum()))
        return {
            "usage_counts": counts,
            "usage_fraction": float((counts > 0).double().mean()),
            "perplexity": perplexity,
            "restarts": int(self.restarts),
            "vectors": total,
        }

    def extra_repr(self) -> str:
        mode = f"ema(decay={self.decay})" if self.use_ema else "learned"
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, lookup_dim={self.lookup_dim}, "
            f"{mode}, cosine={self.use_cosine}, restart_after_steps={self.restart_after_steps}"
        )
