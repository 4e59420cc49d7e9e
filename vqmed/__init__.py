"""vqmed: medical-imaging feature extraction with VQ-VAEs built on MONAI.

Data flows one way: config -> manifest -> dataset -> model -> store -> probe, with MLflow
tracking beside every stage. Each sub-package owns one stage:

- :mod:`vqmed.data`: manifests, DICOM/NIfTI/PNG/JPEG loading with MONAI, caching, quarantine, preview.
- :mod:`vqmed.networks`: MONAI-style VQ-VAE (2D/3D), VQ-VAE-2 and the vector quantizer.
- :mod:`vqmed.models_io`: checkpoint format, ``load_model``, model fingerprint, runtime.
- :mod:`vqmed.training`: the pretraining engine (DDP-ready) and its objectives.
- :mod:`vqmed.export`: frozen-encoder export of code maps and embeddings to a store.
- :mod:`vqmed.downstream`: few-label probes and the label-budget benchmark (inputs, engine, report).
- :mod:`vqmed.tracking`: every MLflow call and the figures; imports no other vqmed room.
- :mod:`vqmed.config`, :mod:`vqmed.atomic`: typed configs; the one atomic-write helper.

Imports point down these floors (``docs/architecture.md``; ``tests/test_architecture.py`` checks it).
"""

__version__ = "0.1.0"
