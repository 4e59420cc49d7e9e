"""Project-level checks: declared dependencies agree, README commands drive CI, configs validate."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from vqmed.config import ComputeCurveConfig, ConfigError, PipelineConfig, PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    declared = {_name(r): r.replace(" ", "") for r in project["dependencies"] + extras}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda = {_name(r): r.replace(" ", "") for r in pip_list if not r.startswith("-e")}
    assert set(conda) == set(declared)
    for name, spec in declared.items():
        if name != "torch":  # the conda file pins the CPU build the README installs first
            assert conda[name] == spec, f"{name}: pyproject {spec!r} != environment.yml {conda[name]!r}"


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)\n```\s*<!-- /{marker} -->", text, re.S)
    assert block, f"README.md lacks the {marker} block"
    return block.group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = _readme_block("test-command")
    assert "pip install -q torch==2.13.0" in command and "pytest" in command
    out = subprocess.run(
        ["bash", "-c", "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md "
         "| sed -n '/^```bash$/,/^```$/p' | sed '1d;$d'"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == command
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    main_at, test_at = text.find("<!-- main-command -->"), text.find("<!-- test-command -->")
    assert 0 < main_at < test_at < text.find("\n## ")
    assert "pip install -q torch==2.13.0" in _readme_block("main-command")


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_pretrain_configs_validate(config):
    cfg = load_config(PretrainConfig, config)
    for manifest in cfg.data.manifests:
        assert (ROOT / manifest).is_file(), f"{config.name}: manifest {manifest} is not committed"


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "pipeline").glob("*.yaml")), ids=lambda p: p.stem)
def test_pipeline_configs_validate_with_their_export_overrides(config):
    cls = ComputeCurveConfig if config.stem.startswith("compute_curve") else PipelineConfig
    cfg = load_config(cls, config)
    assert (ROOT / cfg.manifest).is_file(), f"{config.name}: manifest {cfg.manifest} is not committed"
    # every pipeline exports from the pretraining's decoded images rather than decoding the archive again
    assert "cache_dir=.vqmed_cache" in cfg.export_overrides
    # a bad export override is refused when the config loads, naming it, not minutes later at the export step
    for override, message in (("grid=0", r"export_overrides: grid: must be >= 1"),
                              ("out=elsewhere", r"export_overrides\[0\]: 'out' is set by the pipeline"),
                              ("batch", r"export_overrides\[0\]: override 'batch' must look like"),
                              ("grdi=8", r"export_overrides: the export step: unknown key\(s\) \['grdi'\]")):
        with pytest.raises(ConfigError, match=message):
            load_config(cls, config, [f"export_overrides=[{override}]"])


def test_pipeline_reports_a_bad_config_in_one_line():
    result = subprocess.run([sys.executable, "pipelines/pneumonia_low_label.py", "--set", "export_overrides=[grid=0]"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: configs/pipeline/pneumonia_cpu.yaml: export_overrides: grid: must be >= 1" in result.stderr


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  manifests: [x.csv]\n  image_sise: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: data: unknown key\(s\) \['image_sise'\]"):
        load_config(PretrainConfig, path)
    path.write_text("data:\n  manifests: [x.csv]\ntrain:\n  epochs: two\n")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(PretrainConfig, path)
    path.write_text("data:\n  manifests: [x.csv]\n")
    with pytest.raises(ConfigError, match="train.amp: must be bf16, fp16 or off"):
        load_config(PretrainConfig, path, ["train.amp=fp8"])
    cfg = load_config(PretrainConfig, path, ["train.epochs=3", "model.params.channels=[8, 16]"])
    assert cfg.train.epochs == 3 and cfg.model.params["channels"] == [8, 16]
    # the tracking section is validated too (gif_every 0 used to be a ZeroDivisionError mid-run)
    with pytest.raises(ConfigError, match="tracking.gif_every: must be >= 1"):
        load_config(PretrainConfig, path, ["tracking.gif_every=0"])
    with pytest.raises(ConfigError, match="tracking.experiment: must be a non-empty name"):
        load_config(PretrainConfig, path, ["tracking.experiment=' '"])
    # model names come from the networks' registry: the message lists exactly what build_model accepts
    from vqmed.networks.factory import MODELS

    with pytest.raises(ConfigError, match=re.escape(f"model.name: must be one of {sorted(MODELS)}")):
        load_config(PretrainConfig, path, ["model.name=vqgan"])


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 0\n")
    result = subprocess.run([sys.executable, "-m", "vqmed", "pretrain", "--config", str(bad)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "error:" in result.stderr and "data.manifests" in result.stderr and "Traceback" not in result.stderr
