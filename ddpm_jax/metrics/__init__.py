"""FID, Inception Score, KID, precision / recall with the FID Inception-v3 in JAX; a Fréchet
distance for the embedded digits (``ddpm_jax.metrics.digits``).

Typical use (features on the devices in float32 at full precision, statistics in float64):

  feats = inception_features(images_uint8, weights="fid_inception_v3.safetensors")
  stats = FeatureStats(2048).update(feats["pool3"])      # batch after batch
  ref = load_reference_stats("cifar10_train_tf1.npz", mode="tf1",
                             weights_sha256=weights_sha256("fid_inception_v3.safetensors"))
  fid = frechet_distance(*stats.result()[:2], ref.mu, ref.sigma)
  is_mean, is_std = inception_score(feats["logits_unbiased"], splits=10)
  kid_mean, kid_std = kernel_inception_distance(feats["pool3"], ref_feats, seed=0)

Modules: ``network`` (the Flax model and the ``tf1`` / ``pytorch_fid`` preprocessing),
``weights`` (the converted file: loading, checks, provenance), ``inception`` (batched, sharded
feature extraction), ``scores`` (the metrics and the streaming statistics), ``reference``
(statistics files), ``digits`` (the digits' own feature network and ``evaluate_digits``),
``convert`` (the ``python -m ddpm_jax.metrics.convert`` command).
"""

from ddpm_jax.metrics.errors import MetricsError
from ddpm_jax.metrics.inception import inception_features
from ddpm_jax.metrics.reference import (
    ReferenceStats,
    cached_reference_stats,
    load_reference_stats,
    save_reference_stats,
)
from ddpm_jax.metrics.scores import (
    FeatureStats,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    knn_radii,
    precision_recall,
)
from ddpm_jax.metrics.weights import ENV_VAR, is_official, load_weights, weights_sha256

__all__ = [
    "ENV_VAR",
    "FeatureStats",
    "MetricsError",
    "ReferenceStats",
    "cached_reference_stats",
    "feature_statistics",
    "frechet_distance",
    "inception_features",
    "inception_score",
    "is_official",
    "kernel_inception_distance",
    "knn_radii",
    "load_reference_stats",
    "load_weights",
    "precision_recall",
    "save_reference_stats",
    "weights_sha256",
]
