"""vqmed: medical-imaging feature extraction with VQ-VAEs built on MONAI.

Data flows one way: config -> manifest -> dataset -> model -> store -> probe, with MLflow
tracking beside every stage. Each sub-package owns one stage:

- :mod:`vqmed.data`: manifests, DICOM/NIfTI/PNG/JPEG loading with MONAI, caching, quarantine, preview.
- :mod:`vqmed.networks`: MONAI-style VQ-VAE (2D/3D), VQ-VAE-2 and the vector quantizer.
- :mod:`vqmed.training`: the pretraining loop (DDP-ready) and atomic checkpoints.
- :mod:`vqmed.export`: frozen-encoder export of code maps and embeddings to a store.
- :mod:`vqmed.downstream`: few-label probes and the label-budget benchmark.
- :mod:`vqmed.tracking`: MLflow helpers and figures; imports no other vqmed room.
"""

__version__ = "0.1.0"
