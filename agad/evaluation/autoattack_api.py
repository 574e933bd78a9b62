"""AutoAttack as an evaluation entry point (re-exported from ``agad.attacks.autoattack``).

``autoattack(logits_fn, images, labels, key, *, eps, norm="linf", version="standard",
batch_size=250, steps=100, square_queries=5000, verbose=False, ...) -> dict`` with
``robust`` [N] bool, ``adversarial`` [N,H,W,C], ``per_attack`` (ordered name -> robust
accuracy after that attack), ``clean_accuracy``, ``robust_accuracy``, ``std_error``,
``broken_by``, ``flags``. See ``agad.attacks.autoattack`` for the algorithm.
"""

from agad.attacks.autoattack import ATTACKS, VERSIONS, autoattack, bucket_sizes

__all__ = ["ATTACKS", "VERSIONS", "autoattack", "bucket_sizes"]
