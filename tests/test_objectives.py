"""Pretraining objectives on real Kermany images: each learns, keeps the codebook in use, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_training import DATA_ROOT, ROOT, run_pretrain, sigkill_after_checkpoint, tiny_config

from vqmed.config import ConfigError, PretrainConfig, load_config
from vqmed.data import ImageDataset, ImageSpec, read_manifest
from vqmed.data.augment import BatchAugmentation
from vqmed.models_io.checkpoint import latest_checkpoint, load_checkpoint
from vqmed.networks import build_model, vqvae_loss
from vqmed.networks.stages import stage_outputs
from vqmed.training.objectives import OBJECTIVES, build_objective
from vqmed.training.objectives.masked import patch_mask
from vqmed.training.objectives.vicreg import vicreg_terms

pytestmark = pytest.mark.skipif(not (DATA_ROOT / "chest_xray").is_dir(), reason="real Kermany data not found")

TINY = {"channels": [16, 32], "num_res_channels": [16, 32], "num_embeddings": 64, "embedding_dim": 16}


@pytest.fixture(scope="module")
def views(tmp_path_factory) -> torch.Tensor:
    """64 real Kermany train images at 32x32, two augmented views each: ``[64, 2, 1, 32, 32]``."""
    manifest = read_manifest(ROOT / "data_manifests" / "chest_xray.csv")
    rows = manifest[manifest["split"] == "train"].iloc[::80].head(64)
    ds = ImageDataset(rows, DATA_ROOT, ImageSpec(32), cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    films = torch.stack([ds[i]["image"] for i in range(len(ds))])
    return BatchAugmentation(2, "views")(films, 2, torch.Generator().manual_seed(0))


def _train(name: str, params: dict, views: torch.Tensor, steps: int = 40) -> tuple[list[dict[str, float]], torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1, **TINY)
    objective = build_objective(name, params, model, (1, 32, 32))
    optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=2e-3)
    model.quantizer.reset_stats()
    history = []
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = views[torch.randperm(len(views), generator=g)[:16], : objective.views]
        loss, metrics = objective(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: float(v) for k, v in metrics.items()})
    return history, model


def _assert_vicreg_learns(params: dict, views: torch.Tensor) -> None:
    """40 steps of ``vicreg`` with ``params``: the reconstruction and the VICReg term fall, the codebook stays used."""
    history, model = _train("vicreg", params, views)
    assert sum(h["recon_mse"] for h in history[-5:]) < 0.7 * sum(h["recon_mse"] for h in history[:5])
    assert sum(h["vicreg"] for h in history[-5:]) < 0.8 * sum(h["vicreg"] for h in history[:5])
    assert model.quantizer.stats()["usage_fraction"] > 0.3


def test_views_are_two_different_augmentations_of_one_image(views):
    assert views.shape == (64, 2, 1, 32, 32) and 0.0 <= float(views.min()) and float(views.max()) <= 1.0
    differs = (views[:, 0] - views[:, 1]).abs().flatten(1).mean(1)
    assert bool((differs > 1e-3).all()), "the two views of an image are identical"
    # ... but views of one image are closer to each other than to other images
    other = (views[:, 0] - views.roll(1, 0)[:, 1]).abs().flatten(1).mean(1)
    assert float(differs.mean()) < float(other.mean())


def test_reconstruction_objective_is_the_vqvae_loss(views):
    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1, **TINY).eval()
    objective = build_objective("reconstruction", {}, model, (1, 32, 32))
    loss, metrics = objective(model, views[:8, :1])
    expected, terms, _ = vqvae_loss(model, views[:8, 0])
    assert torch.equal(loss, expected) and torch.equal(metrics["recon_mse"], terms["recon_mse"])
    assert list(objective.parameters()) == []


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_learns_and_uses_the_codebook(name, views):
    history, model = _train(name, {}, views)
    first = sum(h["recon_mse"] for h in history[:5]) / 5
    last = sum(h["recon_mse"] for h in history[-5:]) / 5
    assert last < 0.7 * first, f"{name}: reconstruction did not improve ({first:.4f} -> {last:.4f})"
    assert model.quantizer.stats()["usage_fraction"] > 0.3, f"{name}: codebook collapsed"
    if name == "vicreg":
        start = sum(h["vicreg"] for h in history[:5]) / 5
        end = sum(h["vicreg"] for h in history[-5:]) / 5
        assert end < 0.8 * start, f"VICReg term did not fall ({start:.3f} -> {end:.3f})"
    if name == "teacher":
        start = sum(h["teacher"] for h in history[:5]) / 5
        end = sum(h["teacher"] for h in history[-5:]) / 5
        assert end < 0.8 * start, f"the prediction of the teacher's embedding did not improve ({start:.3f} -> {end:.3f})"


def test_vicreg_can_decode_the_first_view_only(views):
    """``reconstruct: first`` decodes one view of each image instead of two; the VICReg term, which needs both
    views through the encoder only, is the same as with ``both``, and the objective still learns."""
    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1, **TINY).eval()
    decoded = []
    hook = model.decoder.register_forward_hook(lambda _m, i, _o: decoded.append(i[0].shape[0]))
    batch = views[:8]
    both = build_objective("vicreg", {"reconstruct": "both"}, model, (1, 32, 32)).eval()
    first = build_objective("vicreg", {"reconstruct": "first"}, model, (1, 32, 32)).eval()
    first.load_state_dict(both.state_dict())
    _, from_both = both(model, batch)
    _, from_first = first(model, batch)
    hook.remove()
    assert decoded == [16, 8]
    for term in ("vicreg_invariance", "vicreg_variance", "vicreg_covariance"):
        assert torch.allclose(from_both[term], from_first[term], atol=1e-6), term
    assert torch.equal(from_first["recon_mse"], vqvae_loss(model, batch[:, 0])[1]["recon_mse"])
    _assert_vicreg_learns({"reconstruct": "first"}, views)


def test_vicreg_can_decode_a_share_of_the_first_views(views):
    """``decode_fraction: 0.25`` decodes the first view of a quarter of the images; the rest go through the encoder
    alone, so the VICReg term (every image's two views) is the one ``reconstruct: first`` computes, and the
    objective still learns and uses the codebook."""
    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1, **TINY).eval()
    encoded, decoded = [], []
    hooks = [model.encoder.register_forward_hook(lambda _m, i, _o: encoded.append(i[0].shape[0])),
             model.decoder.register_forward_hook(lambda _m, i, _o: decoded.append(i[0].shape[0]))]
    every = build_objective("vicreg", {"reconstruct": "first"}, model, (1, 32, 32)).eval()
    share = build_objective("vicreg", {"reconstruct": "first", "decode_fraction": 0.25}, model, (1, 32, 32)).eval()
    share.load_state_dict(every.state_dict())
    encoded.clear()
    _, from_every = every(model, views[:8])
    _, from_share = share(model, views[:8])
    for hook in hooks:
        hook.remove()
    assert encoded == [8, 8, 2, 6, 8] and decoded == [8, 2]
    for term in ("vicreg_invariance", "vicreg_variance", "vicreg_covariance"):
        assert torch.allclose(from_every[term], from_share[term], atol=1e-5), term
    assert torch.equal(from_share["recon_mse"], vqvae_loss(model, views[:2, 0])[1]["recon_mse"])
    _assert_vicreg_learns({"reconstruct": "first", "decode_fraction": 0.25}, views)


def test_vicreg_second_view_can_be_a_smaller_crop(views):
    """``second_view_scale: 0.5`` sends the second view through the encoder at half the side (a quarter of its
    pixels) and never decodes it; the pooled embedding has the same width, and the objective still learns."""
    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1, **TINY).eval()
    objective = build_objective("vicreg", {"reconstruct": "first", "second_view_scale": 0.5}, model, (1, 32, 32))
    encoded, decoded = [], []
    hooks = [model.encoder.register_forward_hook(lambda _m, i, _o: encoded.append(tuple(i[0].shape))),
             model.decoder.register_forward_hook(lambda _m, i, _o: decoded.append(i[0].shape[0]))]
    objective(model, views[:8])
    for hook in hooks:
        hook.remove()
    assert encoded == [(8, 1, 32, 32), (8, 1, 16, 16)] and decoded == [8]
    _assert_vicreg_learns({"reconstruct": "first", "second_view_scale": 0.5}, views)


def test_vicreg_embedding_can_keep_a_grid_of_cells(views):
    """``embedding_grid: 2`` pools each stage's mean and spread in 2x2 cells: the projector sees four times the
    whole-image statistics, a cell's spread is its own (not the image's), a constant cell still has finite
    gradients, and the objective learns."""
    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1, **TINY)
    whole = build_objective("vicreg", {}, model, (1, 32, 32))
    grid = build_objective("vicreg", {"embedding_grid": 2}, model, (1, 32, 32))
    assert grid.projector[0].in_features == 4 * whole.projector[0].in_features
    stage = torch.zeros(2, 3, 8, 8)
    stage[:, :, :4, :4] = torch.randn(2, 3, 4, 4)  # one textured cell, three constant ones
    stats = grid.pool(stage).view(2, 2, 3, 4)  # [B, mean / spread, channel, cell]
    assert torch.allclose(stats[:, 1, :, 0], stage[:, :, :4, :4].flatten(2).std(dim=2, unbiased=False), atol=1e-3)
    assert torch.all(stats[:, 1, :, 1:] < 1e-2)
    stage.requires_grad_(True)
    grid.pool(stage).sum().backward()
    assert torch.isfinite(stage.grad).all()
    _assert_vicreg_learns({"embedding_grid": 2}, views)


def test_cells_can_be_embedded_one_by_one_and_matched_cell_to_cell(views):
    """``cell_embedding``: each cell's statistics (the same numbers as the concatenated grid's) go through one
    shared projector, so its input is a whole-image embedding's width; the views' cells become rows matched
    cell to cell (batch x cells rows for VICReg's statistics), for ``vicreg`` and the ``teacher`` alike, and
    the objective learns."""
    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1, **TINY)
    whole = build_objective("vicreg", {}, model, (1, 32, 32))
    concat = build_objective("vicreg", {"embedding_grid": 2}, model, (1, 32, 32))
    cells = build_objective("vicreg", {"embedding_grid": 2, "cell_embedding": True}, model, (1, 32, 32))
    assert cells.projector[0].in_features == whole.projector[0].in_features
    stage = torch.randn(3, 5, 8, 8)
    per_cell = cells.pool(stage)  # [B, cell, mean / spread x channel]
    assert per_cell.shape == (3, 4, 10)
    # the same statistics as the concatenated grid's ([B, mean / spread, channel, cell]), cell by cell
    torch.testing.assert_close(per_cell, concat.pool(stage).view(3, 2, 5, 4).permute(0, 3, 1, 2).reshape(3, 4, 10))
    teacher = build_objective("teacher", {"embedding_grid": 2, "cell_embedding": True}, model, (1, 32, 32))
    model.eval()
    with torch.no_grad():
        for objective in (cells, teacher):
            objective.eval()  # the projector's BatchNorm on running statistics: rows independent of one another
            _, _, z1, z2 = objective.embed_views(model, views[:6])
            assert z1.shape == z2.shape == (6 * 4, objective.projector[-1].out_features)
            # row 4i + k of the first views' embedding is cell k of image i, projected on its own
            with stage_outputs(objective.stages_of(model), objective.pool) as caught:
                model.encode(views[:6, 0])
            torch.testing.assert_close(z1, objective.project(torch.cat(caught, dim=-1)).flatten(0, 1))
    model.train()
    teacher.train()
    loss, metrics = teacher(model, views[:8])
    assert torch.isfinite(loss) and torch.isfinite(metrics["teacher"])
    # it learns: over batch x cells rows the VICReg term starts lower and falls more slowly than the
    # concatenated grid's (measured: -15% against -34% in 80 steps), so 80 steps and a 10% fall here
    history, trained = _train("vicreg", {"embedding_grid": 2, "cell_embedding": True}, views, steps=80)
    assert sum(h["recon_mse"] for h in history[-5:]) < 0.7 * sum(h["recon_mse"] for h in history[:5])
    assert sum(h["vicreg"] for h in history[-5:]) < 0.9 * sum(h["vicreg"] for h in history[:5])
    assert trained.quantizer.stats()["usage_fraction"] > 0.3


def test_vicreg_second_view_can_be_masked(views):
    """``second_view_mask: 0.5`` (Masked Siamese Networks) hides half of the second view's latent-cell patches,
    filled with the view's mean, before the encoder: the first view is untouched and still decoded, the second
    is never decoded, and the objective still learns."""
    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1, **TINY).eval()
    params = {"reconstruct": "first", "second_view_mask": 0.5}
    objective = build_objective("vicreg", params, model, (1, 32, 32))
    seen, decoded = [], []
    hooks = [model.encoder.register_forward_hook(lambda _m, i, _o: seen.append(i[0].detach().clone())),
             model.decoder.register_forward_hook(lambda _m, i, _o: decoded.append(i[0].shape[0]))]
    batch = views[:8]
    objective(model, batch)
    for hook in hooks:
        hook.remove()
    assert torch.equal(seen[0], batch[:, 0]) and decoded == [8]
    second, original = seen[1], batch[:, 1]
    changed = torch.nn.functional.avg_pool2d((second != original).float(), objective.mask_patch)
    # whole patches are replaced, about half of them in every view (a patch the fill leaves equal counts as kept)
    assert bool(((changed == 0) | (changed > 0.5)).all())
    assert ((changed > 0.5).float().mean(dim=(1, 2, 3)) > 0.45).all()
    hidden = changed.repeat_interleave(objective.mask_patch, 2).repeat_interleave(objective.mask_patch, 3) > 0.5
    fill = original.mean(dim=(1, 2, 3), keepdim=True).expand_as(original)
    assert torch.allclose(second[hidden], fill[hidden])
    _assert_vicreg_learns(params, views)

    with pytest.raises(ConfigError, match="^objective 'vicreg': mask_patch 5 does not divide the input size"):
        build_objective("vicreg", {**params, "mask_patch": 5}, model, (1, 32, 32))

    # a momentum teacher's targets stay whole (MSN): the student encodes the masked second view, the teacher not
    teacher = build_objective("teacher", params, model, (1, 32, 32))
    student_seen, teacher_seen = [], []
    hooks = [model.encoder.register_forward_hook(lambda _m, i, _o: student_seen.append(i[0].detach().clone())),
             teacher.teacher.module["model"].encoder.register_forward_hook(
                 lambda _m, i, _o: teacher_seen.append(i[0].detach().clone()))]
    teacher(model, batch)
    for hook in hooks:
        hook.remove()
    assert not torch.equal(student_seen[1], batch[:, 1])
    assert torch.equal(teacher_seen[0], batch[:, 0]) and torch.equal(teacher_seen[1], batch[:, 1])


def test_masked_objective_drops_hidden_patches_from_a_vit(views):
    """With the ViT VQ-VAE the masked objective hides patches by dropping their tokens (MAE): the encoder sees
    only the visible quarter, the objective's mask token is trained, and the reconstruction improves."""
    torch.manual_seed(0)
    model = build_model("vit_vqvae", img_size=32, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2,
                        num_embeddings=64, embedding_dim=16)
    objective = build_objective("masked", {"mask_ratio": 0.75, "patch": 8}, model, (1, 32, 32))
    seen = []
    hook = model.encoder_blocks[0].block.register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape[1]))
    optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(0)
    mse = []
    for _ in range(40):
        loss, metrics = objective(model, views[torch.randperm(len(views), generator=g)[:16], :1])
        optimizer.zero_grad()
        loss.backward()
        assert objective.mask_token.grad is not None and float(objective.mask_token.grad.abs().sum()) > 0
        optimizer.step()
        mse.append(float(metrics["recon_mse"]))
    hook.remove()
    assert set(seen) == {16}  # 25% of the 64 tokens: the encoder never ran on the hidden ones
    assert sum(mse[-5:]) < 0.7 * sum(mse[:5])
    with pytest.raises(ConfigError, match="multiple of the model's patch_size"):
        build_objective("masked", {"patch": 2}, model, (1, 32, 32))


def test_teacher_is_a_moving_average_of_the_student_without_gradients(views):
    """The teacher starts as the student, gets no gradient, and after training lies between its start and the
    student (an EMA: moved, but behind); evaluation does not move it."""
    torch.manual_seed(0)
    model = build_model("vqvae", spatial_dims=2, in_channels=1, out_channels=1, **TINY)
    objective = build_objective("teacher", {"momentum": 0.9, "reconstruct": "first"}, model, (1, 32, 32))
    teacher = objective.teacher.module["model"]
    start = [p.detach().clone() for p in teacher.parameters()]
    assert all(torch.equal(t, s) for t, s in zip(start, model.parameters()))
    optimizer = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=2e-3)
    for step in range(10):
        loss, _ = objective(model, views[16 * (step % 4) : 16 * (step % 4 + 1)])
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in objective.teacher.parameters())
        optimizer.step()
    assert int(objective.teacher.n_averaged) == 10

    def distance(a, b):
        return sum(float((x - y).pow(2).sum()) for x, y in zip(a, b))

    moved, behind = distance(teacher.parameters(), start), distance(teacher.parameters(), model.parameters())
    assert moved > 0 and behind > 0 and distance(start, model.parameters()) > max(moved, behind)
    objective.eval()
    objective(model, views[:16])
    assert int(objective.teacher.n_averaged) == 10


def test_vicreg_terms_reward_agreement_and_spread():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 32, generator=g)
    same = vicreg_terms(z, z)
    assert float(same["invariance"]) == 0.0 and float(same["variance"]) < 0.05
    collapsed = vicreg_terms(torch.zeros(64, 32), torch.zeros(64, 32))
    assert float(collapsed["variance"]) > 0.9  # every dimension below the hinge
    correlated = torch.randn(64, 1, generator=g).repeat(1, 32)
    assert float(vicreg_terms(correlated, correlated)["covariance"]) > 10 * float(same["covariance"])


def test_patch_mask_hides_the_asked_share_in_whole_patches():
    torch.manual_seed(0)
    mask = patch_mask((4, 1, 32, 32), patch=4, ratio=0.5, device=torch.device("cpu"))
    assert mask.shape == (4, 1, 32, 32)
    assert torch.allclose(mask.mean(dim=(1, 2, 3)), torch.full((4,), 0.5))
    cells = torch.nn.functional.avg_pool2d(mask, 4)
    assert bool(((cells == 0) | (cells == 1)).all()), "a patch is partly hidden"


def test_objective_config_errors_name_the_key(tmp_path):
    base = yaml.safe_load(tiny_config(tmp_path, tmp_path / "cache").read_text())
    for objective, needle in (
        ({"name": "simclr"}, "objective.name"),
        ({"name": "vicreg", "params": {"wieght": 1.0}}, "objective.params: unknown key(s) ['wieght']"),
        ({"name": "vicreg", "params": {"stages": "first"}}, "objective.params.stages"),
        ({"name": "vicreg", "params": {"reconstruct": "second"}}, "objective.params.reconstruct"),
        ({"name": "vicreg", "params": {"second_view_scale": 0.5}}, "objective.params.second_view_scale < 1 needs"),
        ({"name": "vicreg", "params": {"second_view_scale": 0}}, "objective.params.second_view_scale"),
        ({"name": "vicreg", "params": {"decode_fraction": 0.5}}, "objective.params.decode_fraction < 1 needs"),
        ({"name": "vicreg", "params": {"second_view_mask": 0.5}}, "objective.params.second_view_mask > 0 needs"),
        ({"name": "vicreg", "params": {"reconstruct": "first", "second_view_mask": 1.0}}, "objective.params.second_view_mask"),
        ({"name": "vicreg", "params": {"reconstruct": "first", "decode_fraction": 1.5}}, "objective.params.decode_fraction"),
        ({"name": "vicreg", "params": {"embedding_grid": 0}}, "objective.params.embedding_grid"),
        ({"name": "vicreg", "params": {"cell_embedding": True}}, "objective.params.cell_embedding needs embedding_grid >= 2"),
        ({"name": "masked", "params": {"mask_ratio": 1.5}}, "objective.params.mask_ratio"),
        ({"name": "vicreg", "params": {"weight": "high"}}, "objective.params.weight"),
        ({"name": "teacher", "params": {"momentum": 1.0}}, "objective.params.momentum"),
        ({"name": "teacher", "params": {"predictor": [64, 32]}}, "objective.params.predictor must end at"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, "objective": objective}))
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
            load_config(PretrainConfig, path)


@pytest.mark.parametrize(
    "name, own_state",
    [("vicreg", ("projector.",)), ("teacher", ("projector.", "predictor.", "teacher.module.model.", "teacher.module.projector."))],
)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(name, own_state, tmp_path):
    """A non-default objective with its own weights (projector, BatchNorm statistics; the teacher's EMA copy of
    the model) resumes exactly."""
    cache = tmp_path / "cache"
    widths = "[64,64]"
    objective = ["--set", f"objective.name={name}", "--set", f"objective.params.projector={widths}"]
    if name == "teacher":
        objective += ["--set", f"objective.params.predictor={widths}"]
    (tmp_path / "ref").mkdir()
    reference_cfg = tiny_config(tmp_path / "ref", cache, epochs=1)
    run_pretrain(reference_cfg, *objective)
    reference = json.loads((tmp_path / "ref" / "run" / "summary.json").read_text())

    (tmp_path / "kill").mkdir()
    config = tiny_config(tmp_path / "kill", cache, epochs=1)
    ckpt_dir = tmp_path / "kill" / "run" / "checkpoints"
    sigkill_after_checkpoint(config, ckpt_dir, 8, *objective)
    killed = latest_checkpoint(ckpt_dir)[0]
    assert 0 < killed["step"] < reference["steps"] and killed["objective_name"] == name
    for prefix in own_state:
        assert any(k.startswith(prefix) for k in killed["objective_state"]), f"{prefix} not checkpointed"
    # Resuming with another objective is refused in one line.
    wrong = run_pretrain(config, "--resume", check=False)
    assert wrong.returncode == 2 and "objective.name" in wrong.stderr
    run_pretrain(config, "--resume", *objective)
    summary = json.loads((tmp_path / "kill" / "run" / "summary.json").read_text())
    assert summary["steps"] == reference["steps"]
    a, b = load_checkpoint(Path(summary["checkpoint"])), load_checkpoint(Path(reference["checkpoint"]))
    for part in ("model_state", "objective_state"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.allclose(a[part][k].float(), b[part][k].float(), atol=1e-4) for k in a[part]), part
    if name == "teacher":
        # the teacher was updated once a step (the first update copies the student it started as)
        assert int(a["objective_state"]["teacher.n_averaged"]) == summary["steps"]
