"""vqmed.networks: MONAI-style blocks, the vector quantizer, VQ-VAE (2D/3D), VQ-VAE-2, ViT VQ-VAE and the MONAI baseline.

Knows nothing of data or training. All models share one API: ``encode``, ``quantize``,
``index_quantize``, ``decode``, ``decode_indices``, ``forward -> (reconstruction, losses, indices)``,
``levels``, ``quantizers``, ``latent_shape`` and ``config`` (rebuild with ``build_model(name, **config)``);
``vqvae_loss`` is their training objective (reconstruction MSE + quantizer losses), written once.
"""

from vqmed.networks.factory import MODELS, build_model
from vqmed.networks.losses import vqvae_loss
from vqmed.networks.monai_baseline import MonaiVQVAE
from vqmed.networks.quantizer import VectorQuantizer
from vqmed.networks.vqvae import VQVAE
from vqmed.networks.vqvae2 import VQVAE2
from vqmed.networks.vit_vqvae import ViTVQVAE

__all__ = ["MODELS", "VQVAE", "VQVAE2", "MonaiVQVAE", "ViTVQVAE", "VectorQuantizer", "build_model", "vqvae_loss"]
