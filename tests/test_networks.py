"""Tests of vqmed.networks on real data: Kermany chest X-rays (PIL, 64x64) and the MNI152 template (3D)."""

from __future__ import annotations

import glob
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vqmed.networks import VQVAE, VQVAE2, VectorQuantizer, ViTVQVAE, build_model, vqvae_loss

DATA_ROOT = Path(os.environ.get("VQMED_DATA_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

# a small, fast configuration for the default suite
SMALL = dict(channels=(16, 32), num_res_layers=1, num_res_channels=(16, 16), num_embeddings=128, embedding_dim=16)
# the ViT's counterpart: 4x4 patches of a 64x64 image, one narrow transformer block each side
SMALL_VIT = dict(img_size=64, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2, num_embeddings=128,
                 embedding_dim=16)


@pytest.fixture(autouse=True)
def _one_thread():
    # the machine is shared: tests run single-threaded and deterministic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@lru_cache(maxsize=4)
def kermany(n: int, size: int = 64, offset: int = 0) -> torch.Tensor:
    """``n`` Kermany training images spread over both classes, grey, resized, in [0, 1]: ``[n, 1, size, size]``."""
    paths = sorted(glob.glob(str(DATA_ROOT / "chest_xray" / "train" / "*" / "*.jpeg")))
    if len(paths) < n:
        pytest.skip(f"Kermany images not found under {DATA_ROOT} (set VQMED_DATA_ROOT)")
    picks = np.linspace(0, len(paths) - 1, n).astype(int) if offset == 0 else np.arange(offset, offset + n)
    images = []
    for i in picks:
        with Image.open(paths[i]) as im:
            im.draft("L", (size, size))  # JPEG DCT scaling: decodes at reduced size, much faster
            images.append(np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32))
    return torch.from_numpy(np.stack(images) / 255.0).unsqueeze(1)


def mni_volume(size: int = 64) -> torch.Tensor:
    """nilearn's MNI152 T1 template resized to ``size``^3, scaled to [0, 1]: ``[1, 1, size, size, size]``."""
    nib = pytest.importorskip("nibabel")
    nilearn = pytest.importorskip("nilearn")
    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        pytest.skip(f"MNI152 template not found at {path}")
    vol = torch.from_numpy(np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float32))[None, None]
    vol = F.interpolate(vol, size=(size,) * 3, mode="trilinear", align_corners=False)
    return (vol - vol.min()) / (vol.max() - vol.min())


def patches(n_images: int = 64, patch: int = 4) -> torch.Tensor:
    """Real vectors for quantizer tests: 4x4 patches of X-rays as 16-dim latents ``[n, 16, 16, 16]``."""
    return F.pixel_unshuffle(kermany(n_images), patch)


def train_steps(model, images: torch.Tensor, steps: int, batch: int = 16, lr: float = 2e-3) -> list[float]:
    """Plain Adam loop; returns the reconstruction MSE of every step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        loss, terms, _ = vqvae_loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(terms["recon_mse"].item())
    return losses


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (also the non-persistent statistics)."""
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


# ----------------------------------------------------------------------------- quantizer


def test_quantizer_nearest_code_and_straight_through():
    z = patches().requires_grad_(True)
    vq = VectorQuantizer(64, 16, kmeans_init=True)
    vq(z.detach())  # training forward: k-means init and one EMA step
    vq.eval()
    z_q, idx, losses = vq(z)
    dist = torch.cdist(z.detach().movedim(1, -1).reshape(-1, 16).double(), vq.embed.double())
    assert idx.shape == (64, 16, 16) and idx.dtype == torch.long
    chosen = dist.gather(1, idx.reshape(-1, 1)).squeeze(1)
    assert torch.allclose(chosen, dist.min(1).values, atol=1e-5)  # the nearest code (up to exact ties)
    assert torch.allclose(z_q, vq.get_codes_from_indices(idx), atol=1e-6)
    assert torch.allclose(vq.codebook, vq.embed) and vq.codebook.shape == (64, 16)
    # straight-through: d(sum z_q)/dz is the identity; commitment pulls z towards its code
    (z_q.sum() + 0 * losses["commitment"]).backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    assert set(losses) == {"commitment", "codebook"} and losses["commitment"].item() > 0


def test_quantizer_distances_in_fp32_under_autocast():
    vq = VectorQuantizer(128, 16).eval()
    vq.embed.copy_(patches(8).movedim(1, -1).reshape(-1, 16)[::16][:128])
    z = patches(16).bfloat16()
    ref = vq(z.float())[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, idx, _ = vq(z)
        flat = z.movedim(1, -1).reshape(-1, 16)
        naive = (flat.float().pow(2).sum(1, keepdim=True) - 2 * flat @ vq.embed.t() + vq.embed.pow(2).sum(1)).argmin(1)
    assert torch.equal(idx, ref)
    assert not torch.equal(naive, ref.reshape(-1))  # the same formula in bf16 mis-assigns near-ties
    assert z_q.dtype == torch.bfloat16


def test_kmeans_init_and_ema_reduce_quantization_error():
    z = patches(128)
    vq = VectorQuantizer(256, 16, decay=0.9, restart_after_steps=0)
    before = ((vq.lookup(z)[0] - z) ** 2).mean()
    errors = [float(((vq(z[i : i + 32])[0] - z[i : i + 32]) ** 2).mean()) for i in range(0, 128, 32)]
    after = ((vq.lookup(z)[0] - z) ** 2).mean()
    assert bool(vq.initialized)
    assert after < 0.05 * before  # k-means from the first batch replaces the random codebook
    assert errors[-1] <= errors[0] * 1.5
    st = vq.stats()
    assert st["vectors"] == 128 * 256 and st["usage_fraction"] > 0.8 and st["perplexity"] > 100


def test_dead_codes_are_restarted_from_encoder_outputs():
    z = patches(64)
    vq = VectorQuantizer(64, 16, kmeans_init=False, restart_after_steps=3)
    # a random N(0, 1) codebook is far from X-ray patches in [0, 1]: most codes are never chosen
    first = vq(z[:32])[1]
    assert first.unique().numel() < 32
    for i in range(4):
        vq(z[(i % 2) * 32 : (i % 2 + 1) * 32])
    st = vq.stats()
    assert st["restarts"] > 30
    # restarted codes are real patch vectors: every code is now close to the data
    dist = torch.cdist(vq.embed, z.movedim(1, -1).reshape(-1, 16)).min(1).values
    assert float(dist.median()) < 0.5
    vq.reset_stats()
    vq(z[:32])
    assert vq.stats()["usage_fraction"] > 0.5


def test_learned_codebook_cosine_and_factorised_lookup():
    z = patches(32).requires_grad_(True)
    vq = VectorQuantizer(64, 16, decay=None, use_cosine=True, lookup_dim=4)
    z_q, idx, losses = vq(z)
    assert isinstance(vq.embed, torch.nn.Parameter) and losses["codebook"].item() > 0
    (F.mse_loss(z_q, z.detach()) + losses["codebook"] + losses["commitment"]).backward()
    assert vq.embed.grad is not None and vq.embed.grad.abs().sum() > 0
    assert vq.project_in.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    assert torch.allclose(vq.get_codes_from_indices(idx), z_q, atol=1e-5)
    assert vq.codebook.shape == (64, 16)
    assert torch.allclose(F.normalize(vq.embed, dim=1).norm(dim=1), torch.ones(64))


def test_quantizer_rejects_bad_input():
    vq = VectorQuantizer(16, 8)
    with pytest.raises(ValueError, match="embedding_dim|latents"):
        vq(torch.zeros(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        vq.get_codes_from_indices(torch.tensor([[16]]))
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(16, 8, decay=1.0)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["vqvae", "vqvae2", "monai_vqvae", "vit_vqvae"])
def test_model_api_shapes_and_config_roundtrip(name):
    params = {
        "vqvae": dict(SMALL, output_act="SIGMOID"),
        "vit_vqvae": dict(SMALL_VIT, output_act="SIGMOID"),
        "vqvae2": dict(SMALL, top_channels=32),
        "monai_vqvae": dict(channels=(16, 32), num_res_layers=1, num_embeddings=64, embedding_dim=16),
    }[name]
    model = build_model(name, **params)
    x = kermany(8)
    recon, losses, _ = model(x)
    assert recon.shape == x.shape and {"commitment", "codebook"} <= set(losses)
    model.eval()
    with torch.no_grad():
        z = model.encode(x)
        z_q, idx, _ = model.quantize(z)
        idx2 = model.index_quantize(x)
        out = model.decode_indices(idx2)
        assert torch.allclose(out, model.decode(z_q), atol=1e-5) and torch.allclose(out, model(x)[0], atol=1e-5)
    if model.levels == 2:
        assert model.latent_shape(64) == ((16, 16), (8, 8))
        assert [i.shape for i in idx2] == [(8, 16, 16), (8, 8, 8)] and all(torch.equal(a, b) for a, b in zip(idx, idx2))
        assert z[0].shape == (8, 16, 16, 16) and z[1].shape == (8, 16, 8, 8)
    else:
        assert model.latent_shape(64) == (16, 16) == tuple(idx2.shape[1:]) and torch.equal(idx, idx2)
        assert z.shape == (8, 16, 16, 16)
    assert len(model.quantizers) == model.levels
    for q in model.quantizers:
        assert q.codebook.shape[1] == 16 and 0 < q.stats()["usage_fraction"] <= 1
    # a checkpoint rebuilds the same model from its config
    rebuilt = build_model(name, **model.config)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x)[0], model(x)[0])
    if name in ("vqvae", "vit_vqvae"):
        assert float(out.min()) >= 0 and float(out.max()) <= 1  # output_act="SIGMOID"


def test_build_model_errors_name_the_argument():
    with pytest.raises(ValueError, match="unknown argument.*'chanels'"):
        build_model("vqvae", chanels=(8, 16))
    with pytest.raises(ValueError, match="downsample"):
        build_model("vqvae", downsample=6)
    with pytest.raises(ValueError, match="channels"):
        build_model("vqvae", channels=(8, 16, 32, 64), downsample=4)
    with pytest.raises(ValueError, match="num_res_layers"):
        build_model("vqvae", channels=(8, 16), num_res_layers=(1, 2, 3))
    with pytest.raises(ValueError, match="stem"):
        build_model("vqvae", stem="pool")
    with pytest.raises(ValueError, match="output_act"):
        build_model("vqvae", output_act="squash")
    with pytest.raises(ValueError, match="spatial_dims"):
        build_model("vqvae2", spatial_dims=1)
    with pytest.raises(ValueError, match="downsample"):
        build_model("monai_vqvae", channels=(8, 16), downsample=8)
    with pytest.raises(ValueError, match="unknown model name"):
        build_model("vqgan")
    model = build_model("vqvae", **SMALL)
    with pytest.raises(ValueError, match="input channel"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 1, 62, 62))


def test_gradients_reach_encoder_through_quantizer():
    for params in (
        SMALL,
        dict(SMALL, decay=None, use_cosine=True, lookup_dim=8, stem="patchify", upsample="transpose"),
    ):
        model = VQVAE(**params)
        x = kermany(16)
        recon, _, _ = model(x)
        F.mse_loss(recon, x).backward()  # reconstruction only: the encoder learns only via straight-through
        first = model.encoder.blocks[0].conv.conv.weight.grad
        assert first is not None and float(first.abs().sum()) > 0


def test_eval_never_changes_codebook():
    x = kermany(16)
    models = (VQVAE(**SMALL), VQVAE2(**SMALL, top_channels=32), VQVAE(**SMALL, restart_after_steps=1, decay=None),
              ViTVQVAE(**SMALL_VIT))
    for model in models:
        before_init = state(model)
        model.eval()
        with torch.no_grad():
            for _ in range(3):
                model(x)
                model.index_quantize(x)
        after = state(model)
        assert all(torch.equal(before_init[k], after[k]) for k in before_init)  # no k-means in eval either
        assert all(q.stats()["vectors"] == 0 for q in model.quantizers)
        model.train()
        model(x)  # training: k-means init + EMA/restarts change the codebook
        trained = state(model)
        assert any(not torch.equal(after[k], trained[k]) for k in after if "embed" in k)
        model.eval()
        with torch.no_grad():
            model(x)
        assert all(torch.equal(trained[k], v) for k, v in state(model).items())


def test_channels_last_gives_same_result():
    model = VQVAE(**SMALL).eval()
    x = kermany(8)
    with torch.no_grad():
        ref, _, idx = model(x)
        model = model.to(memory_format=torch.channels_last)
        out, _, idx_cl = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-4) and (idx == idx_cl).float().mean() > 0.99


def test_vqvae_trains_on_xrays():
    model = VQVAE(**SMALL)
    losses = train_steps(model, kermany(256), steps=40)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_vqvae2_trains_with_both_code_maps():
    model = VQVAE2(**SMALL, top_channels=32)
    images = kermany(256)
    losses = train_steps(model, images, steps=40)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    model.eval()
    with torch.no_grad():
        bottom, top = model.index_quantize(images[:16])
    assert bottom.shape == (16, 16, 16) and top.shape == (16, 8, 8)
    assert bottom.unique().numel() > 20 and top.unique().numel() > 20
    # the decoder reads the top map: decoding with another image's top codes changes the output
    with torch.no_grad():
        own = model.decode_indices((bottom, top))
        swapped = model.decode_indices((bottom, top.roll(1, 0)))
    assert float((own - swapped).abs().max()) > 1e-4


@pytest.mark.parametrize(
    "name, size, grid, steps",
    [("vqvae", 64, 16, 8), ("vit_vqvae", 32, 8, 15)],
)
def test_3d_models_train_on_mni152_volume(name, size, grid, steps):
    torch.manual_seed(0)
    vol = mni_volume(size)
    params = {
        "vqvae": dict(channels=(8, 16), num_res_layers=1, num_res_channels=(8, 16)),
        "vit_vqvae": dict(img_size=32, patch_size=4, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4),
    }[name]
    model = build_model(name, spatial_dims=3, num_embeddings=64, embedding_dim=8, **params)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss, terms, _ = vqvae_loss(model, vol)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(terms["recon_mse"].item())
    idx = model.index_quantize(vol)
    assert idx.shape == (1, grid, grid, grid) and model.latent_shape((size,) * 3) == (grid,) * 3
    assert losses[-1] < 0.5 * losses[0]
    assert model.quantizer.stats()["usage_fraction"] > 0.3


# ----------------------------------------------------------------------------- ViT VQ-VAE


@pytest.mark.parametrize(
    "spatial_dims, img_size, patch_size",
    [(2, (32, 64), 2), (2, (32, 64), 4), (2, (32, 64), 8), (2, (32, 64), 16), (2, (32, 64), (4, 8)), (3, (16, 32, 16), 4)],
)
def test_vit_output_has_the_input_size_for_every_patch_size(spatial_dims, img_size, patch_size):
    """MONAI's ViTAutoEnc upsamples by a fixed 16 (MONAI issue 6668); the patch-to-pixel head writes each patch
    back where the patch embedding took it from, for any patch size, non-square and 3D inputs included."""
    model = ViTVQVAE(spatial_dims=spatial_dims, img_size=img_size, patch_size=patch_size, hidden_size=16, mlp_dim=16,
                     num_layers=1, num_heads=2, num_embeddings=16, embedding_dim=4)
    x = torch.rand(2, 1, *img_size)
    recon, _, idx = model(x)
    grid = tuple(s // p for s, p in zip(img_size, model.patch_size))
    assert recon.shape == x.shape and idx.shape == (2, *grid) == (2, *model.latent_shape(img_size))
    # unpatchify inverts the patch embedding's token order: tokens holding their patch's pixels give the image
    p = model.patch_size
    tokens = F.unfold(x, p, stride=p).transpose(1, 2) if spatial_dims == 2 else (
        x.unfold(2, p[0], p[0]).unfold(3, p[1], p[1]).unfold(4, p[2], p[2]).reshape(2, -1, int(np.prod(p))))
    assert torch.equal(model.unpatchify(tokens), x)


def test_vit_masked_forward_drops_hidden_patches_from_the_encoder():
    torch.manual_seed(0)
    model = ViTVQVAE(**SMALL_VIT)
    x = kermany(4)
    model(x)  # k-means init
    model.eval()
    hidden = torch.zeros(4, 16, 16, dtype=torch.bool)
    for b in range(4):
        hidden[b].view(-1)[torch.randperm(256)[:192]] = True  # 75% hidden, different patches per image
    mask_token = torch.randn(32)
    seen = []
    hook = model.encoder_blocks[0].block.register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape))
    with torch.no_grad():
        recon, _, idx = model(x, hidden=hidden, mask_token=mask_token)
        pixels = hidden.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
        changed = model(torch.where(pixels, torch.rand_like(x), x), hidden=hidden, mask_token=mask_token)[0]
        visible_changed = model(torch.where(pixels, x, torch.rand_like(x)), hidden=hidden, mask_token=mask_token)[0]
    hook.remove()
    assert seen[0] == (4, 64, 32) and idx.shape == (4, 64)  # the encoder and the quantizer saw 64 of 256 tokens
    assert recon.shape == x.shape
    assert torch.equal(recon, changed)  # what lies under the hidden patches never reaches the model
    assert float((recon - visible_changed).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="same, non-zero number"):
        bad = hidden.clone()
        bad[0, 0, 0] = ~bad[0, 0, 0]
        model(x, hidden=bad, mask_token=mask_token)
    with pytest.raises(ValueError, match="mask_token"):
        model(x, hidden=hidden)


def test_vit_errors_name_the_argument():
    with pytest.raises(ValueError, match="patch_size"):
        build_model("vit_vqvae", img_size=64, patch_size=5)
    with pytest.raises(ValueError, match="num_heads"):
        build_model("vit_vqvae", hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="sincos"):
        build_model("vit_vqvae", pos_embed_type="sincos", hidden_size=30, num_heads=3)
    with pytest.raises(ValueError, match="pos_embed_type"):
        build_model("vit_vqvae", pos_embed_type="rotary")
    model = build_model("vit_vqvae", **SMALL_VIT)
    with pytest.raises(ValueError, match="img_size"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="img_size"):
        model.latent_shape(128)


def test_vit_vqvae_trains_on_xrays_and_stages_are_maps():
    torch.manual_seed(0)
    model = ViTVQVAE(**SMALL_VIT)
    losses = train_steps(model, kermany(256), steps=40, lr=2e-3)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert model.quantizer.stats()["usage_fraction"] > 0.3
    # every trainable parameter takes part (DistributedDataParallel refuses unused ones)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    # the feature stages output spatial maps, as the export's grid pooling and VICReg's hooks expect
    from vqmed.networks.stages import stage_outputs

    with torch.no_grad(), stage_outputs(model.feature_stages()) as caught:
        model.encode(kermany(2))
    assert [tuple(c.shape) for c in caught] == [(2, 32, 16, 16)]


# ----------------------------------------------------------------------------- codebook usage


def usage_run(restart: int | None, n_images: int, epochs: int, seconds: float, params: dict) -> dict:
    """Train on ``n_images`` X-rays; return the epoch usage of the last epoch and the loss trend."""
    images = kermany(n_images)
    model = VQVAE(**params, restart_after_steps=restart)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    start, epoch_losses = time.monotonic(), []
    for epoch in range(epochs):
        model.quantizer.reset_stats()
        losses = []
        for idx in torch.randperm(n_images, generator=g).split(32):
            x = images[idx]
            loss, terms, _ = vqvae_loss(model, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(terms["recon_mse"].item())
        epoch_losses.append(float(np.mean(losses)))
        if time.monotonic() - start > seconds and epoch >= 1:
            break
    return dict(model.quantizer.stats(), epoch_losses=epoch_losses, seconds=time.monotonic() - start, epochs=epoch + 1)


def test_codebook_usage_short():
    params = dict(
        channels=(16, 64), num_res_layers=(0, 1), num_res_channels=(16, 32), num_embeddings=512, embedding_dim=32
    )
    on = usage_run(restart=5, n_images=640, epochs=3, seconds=25, params=params)
    off = usage_run(restart=None, n_images=640, epochs=3, seconds=25, params=params)
    print(f"\nusage over last epoch: restarts {on['usage_fraction']:.3f}, no restarts {off['usage_fraction']:.3f}")
    assert on["epoch_losses"][-1] < 0.7 * on["epoch_losses"][0]
    assert on["usage_fraction"] >= 0.9
    assert off["usage_fraction"] < on["usage_fraction"] - 0.1


@pytest.mark.slow
def test_codebook_usage_acceptance_2000_images():
    """Acceptance: 2,000 X-rays at 64x64, 512 codes, <= 5 min: >= 90% of codes used over an epoch.

    The default VQVAE (512 codes) trains for about 2.5 minutes (2 threads) with dead-code restarts on,
    then again with them off; usage is measured over the last full epoch.
    """
    torch.set_num_threads(2)  # "this CPU": both cores (the autouse fixture restores the count)
    on = usage_run(restart=10, n_images=2000, epochs=100, seconds=150, params={})
    off = usage_run(restart=None, n_images=2000, epochs=100, seconds=150, params={})
    for tag, r in (("restart on", on), ("restart off", off)):
        print(
            f"\n{tag}: usage {r['usage_fraction']:.3f} perplexity {r['perplexity']:.1f} epochs {r['epochs']} "
            f"{r['seconds']:.0f}s loss {r['epoch_losses'][0]:.4f} -> {r['epoch_losses'][-1]:.4f}"
        )
    assert on["seconds"] < 300
    assert on["usage_fraction"] >= 0.9
    assert on["epoch_losses"][-1] < 0.5 * on["epoch_losses"][0]
    assert off["epoch_losses"][-1] < 0.5 * off["epoch_losses"][0]
