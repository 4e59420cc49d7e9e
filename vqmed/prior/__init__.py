"""Prior room (floor 5): models trained on the export store's code maps.

Owns the autoregressive prior over code maps (one MONAI ``DecoderOnlyTransformer`` per code level, a fixed
MONAI ``Ordering``, MONAI's ``VQVAETransformerInferer`` for the training forward, ``sample`` and
``get_likelihood``: :mod:`.model`), its training with validation bits per code, checkpoints, resume and MLflow
(:mod:`.train`), samples decoded by the exporting VQ-VAE (:mod:`.sample`), per-study likelihood columns of
the export index (:mod:`.score`) and the QA benchmark of real vs corrupted films (:mod:`.qa`). Reads the store
with ``vqmed.export.load`` and never imports ``training``; ``export`` never imports it.
"""

from vqmed.prior.model import CodeMaps, Level, PriorModel, ordering_for
from vqmed.prior.qa import run_qa
from vqmed.prior.sample import sample_prior
from vqmed.prior.score import score_store
from vqmed.prior.train import load_prior, train_prior

__all__ = ["CodeMaps", "Level", "PriorModel", "load_prior", "ordering_for", "run_qa", "sample_prior", "score_store",
           "train_prior"]
