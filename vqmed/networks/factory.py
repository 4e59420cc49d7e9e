"""Build a network by name from plain keyword arguments (a YAML ``model.params`` or a checkpoint's ``config``)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from vqmed.networks.monai_baseline import MonaiVQVAE
from vqmed.networks.vqvae import VQVAE
from vqmed.networks.vqvae2 import VQVAE2
from vqmed.networks.vit_vqvae import ViTVQVAE

__all__ = ["MODELS", "build_model"]

MODELS: dict[str, type[nn.Module]] = {"vqvae": VQVAE, "vqvae2": VQVAE2, "monai_vqvae": MonaiVQVAE, "vit_vqvae": ViTVQVAE}


def build_model(name: str, **params: Any) -> nn.Module:
    """
    Build ``vqvae`` (:class:`VQVAE`), ``vqvae2`` (:class:`VQVAE2`), ``monai_vqvae`` (:class:`MonaiVQVAE`) or
    ``vit_vqvae`` (:class:`ViTVQVAE`).

    Every model keeps its constructor arguments in ``model.config``, so
    ``build_model(name, **model.config)`` rebuilds it (e.g. from a checkpoint).

    Args:
        name: model name (see :data:`MODELS`).
        params: constructor keyword arguments of that model.

    Raises:
        ValueError: unknown name, unknown argument or invalid value; the message names the model and argument.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(MODELS)}")
    cls = MODELS[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r}: unknown argument(s) {unknown}; allowed: {allowed}")
    try:
        return cls(**params)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"model {name!r}: {exc}") from None
