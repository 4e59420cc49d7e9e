"""DDP worker for tests/test_networks_ddp.py: start with
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_networks_worker.py --out DIR``.

Every rank trains the same models on a DIFFERENT shard of real Kermany X-rays (gloo, CPU) with
``DistributedDataParallel(broadcast_buffers=False)``, so only the quantizer's own synchronisation can keep
the codebooks equal, then writes its final state to ``DIR/rank{R}_{model}.pt`` for the test to compare.
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from vqmed.networks import build_model, vqvae_loss

SMALL = dict(
    channels=(16, 32),
    num_res_layers=1,
    num_res_channels=(16, 16),
    num_embeddings=64,
    embedding_dim=16,
    restart_after_steps=3,
)
MODELS = {
    "ema": ("vqvae", SMALL),
    "learned_cosine_lowdim": ("vqvae", dict(SMALL, decay=None, use_cosine=True, lookup_dim=4)),
    "vqvae2": ("vqvae2", dict(SMALL, top_channels=16)),
    "vit": ("vit_vqvae", dict(img_size=32, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2,
                              num_embeddings=64, embedding_dim=16, restart_after_steps=3)),
    # control: without the quantizer's own sync the codebooks must drift apart
    "ema_unsynced": ("vqvae", dict(SMALL, sync_distributed=False)),
}


def shard(data_root: Path, rank: int, world: int, n: int, size: int) -> torch.Tensor:
    paths = sorted(glob.glob(str(data_root / "chest_xray" / "train" / "*" / "*.jpeg")))
    picks = np.linspace(0, len(paths) - 1, n * world).astype(int)[rank::world]  # disjoint per rank
    images = []
    for i in picks:
        with Image.open(paths[i]) as im:
            im.draft("L", (size, size))
            images.append(np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32))
    return torch.from_numpy(np.stack(images) / 255.0).unsqueeze(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images = shard(Path(args.data_root), rank, world, n=64, size=32)
    out = Path(args.out)
    for tag, (name, params) in MODELS.items():
        torch.manual_seed(0)  # same init; DDP also broadcasts rank 0's parameters and buffers once
        model = build_model(name, **params)
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        opt = torch.optim.Adam(ddp.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(100 + rank)  # different batches on each rank
        losses, batch_means = [], []
        for _ in range(args.steps):
            x = images[torch.randint(len(images), (args.batch,), generator=g)]
            loss, terms, _ = vqvae_loss(ddp, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(terms["recon_mse"].item())
            batch_means.append(x.mean().item())
        torch.save(
            {
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "stats": [q.stats() for q in model.quantizers],
                "losses": losses,
                "batch_means": batch_means,
            },
            out / f"rank{rank}_{tag}.pt",
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
