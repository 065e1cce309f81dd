"""FID, Inception Score, KID, precision and recall from features, in float64 numpy on the host.

All statistics and metric maths run in float64: FID is a small
difference of traces of order 10^2, and float32 sums over 50,000 images lose digits.

* ``FeatureStats``: streaming mean and covariance (``ddof=1``) of features, batch by batch,
  merged with Chan et al.'s pairwise update on centred float64 chunks; any number of images.
* ``frechet_distance``: ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2)``, the trace taken
  as ``sum sqrt(eig(A S2 A))`` with ``A = S1^(1/2)``, both from symmetric eigendecompositions.
* ``inception_score``: ``exp(E_x KL(p(y|x) || p(y)))`` over consecutive, unshuffled splits
  (improved-GAN / TTUR), mean and standard deviation (``ddof=0``) over the splits.
* ``precision_recall``: improved precision and recall (Kynkäänniemi et al. 2019) from k-th
  nearest-neighbour balls, distances in blocks of rows.
* ``kernel_inception_distance``: unbiased MMD^2 with the kernel ``(x.y / d + 1)^3`` over random
  subsets (each drawn without replacement, independently per subset), mean and std.
"""

from __future__ import annotations

import numpy as np

from ddpm_jax.metrics.errors import MetricsError


class FeatureStats:
    """Streaming float64 mean and covariance of feature vectors.

    ``update`` takes batches ``[B, d]`` (any float dtype; upcast to float64); ``merge`` adds
    another accumulator (e.g. another process's). Rows are gathered into chunks of at least
    ``chunk_rows``; each chunk is centred on its own mean, and the running (mean, M2) are
    combined with Chan et al.'s update ``M2 = M2_a + M2_b + delta delta^T n_a n_b / n``, so no
    large sums cancel, and the ``[d, d]`` update runs once per chunk, not once per batch.
    """

    def __init__(self, dim: int, *, chunk_rows: int = 4096):
        self.dim = dim
        self.chunk_rows = chunk_rows
        self._n = 0
        self._mean = np.zeros(dim, np.float64)  # [d]
        self._m2 = np.zeros((dim, dim), np.float64)  # [d, d]: sum of centred outer products
        self._pending: list[np.ndarray] = []  # float64 [B_i, d] not yet combined
        self._pending_rows = 0

    def update(self, features) -> FeatureStats:
        """Adds a batch ``[B, d]`` of features; returns self."""
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise MetricsError(f"features must be [B, {self.dim}], got shape {x.shape}")
        if len(x):
            self._pending.append(x.astype(np.float64))
            self._pending_rows += len(x)
            if self._pending_rows >= self.chunk_rows:
                self._flush()
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Adds the features another accumulator has seen; returns self."""
        if other.dim != self.dim:
            raise MetricsError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self._flush()
        other._flush()
        if other._n:
            self._combine(other._n, other._mean, other._m2)
        return self

    def _flush(self) -> None:
        if not self._pending:
            return
        x = np.concatenate(self._pending)  # [B, d]
        self._pending, self._pending_rows = [], 0
        mean = x.mean(axis=0)
        centred = x - mean
        self._combine(len(x), mean, centred.T @ centred)

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a, n = self._n, self._n + n_b
        delta = mean_b - self._mean  # [d]
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self._n = n

    @property
    def n(self) -> int:
        """Features seen."""
        return self._n + self._pending_rows

    @property
    def mu(self) -> np.ndarray:
        """float64 ``[d]``."""
        self._flush()
        return self._mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        """float64 ``[d, d]``, unbiased (``ddof=1``, as ``np.cov``); needs two features."""
        self._flush()
        if self._n < 2:
            raise MetricsError(f"a covariance needs at least 2 images, got {self._n}")
        return self._m2 / (self._n - 1)

    def result(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(mu float64 ``[d]``, sigma float64 ``[d, d]``, n)."""
        return self.mu, self.sigma, self.n


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 of features ``[N, d]`` (``ddof=1``)."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise MetricsError(f"features must be [N, d], got shape {x.shape}")
    mu, sigma, _ = FeatureStats(x.shape[1]).update(x).result()
    return mu, sigma


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_gaussian(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricsError(f"statistics {which}: mu must be [d] and sigma [d, d], got "
                           f"{mu.shape} and {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise MetricsError(f"statistics {which} hold NaN or infinite values")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between two Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (FID).

    ``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, float64. ``S1 S2`` is
    similar to the symmetric PSD ``A S2 A`` (``A = S1^(1/2)``), so the trace is the sum of the
    square roots of the latter's eigenvalues: no complex arithmetic and no ``eps`` retry.

    Args:
      mu1, mu2: means ``[d]``.
      sigma1, sigma2: covariances ``[d, d]`` (symmetric PSD).

    Returns:
      The distance (a Python float).
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise MetricsError(f"statistics of different dimensions: {mu1.shape[0]} and "
                           f"{mu2.shape[0]}")
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    a = _sqrtm_psd(sigma1)
    m = a @ sigma2 @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits_unbiased, splits: int = 10) -> tuple[float, float]:
    """Inception Score over ``splits`` consecutive, unshuffled splits (float64).

    Split ``i`` is rows ``[i N // splits, (i + 1) N // splits)``; its score is
    ``exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y)))`` with ``p(y)`` the split's mean of
    ``p(y|x) = softmax(logits)``.

    Args:
      logits_unbiased: ``[N, 1008]`` logits without the fc bias (improved-GAN, TTUR).
      splits: number of splits (10 in the literature; 1 as TF-GAN's in-training monitor).

    Returns:
      (mean, std) of the split scores, std with ``ddof=0`` (``np.std``).
    """
    logits = np.asarray(logits_unbiased)
    if logits.ndim != 2:
        raise MetricsError(f"logits must be [N, classes], got shape {logits.shape}")
    n = len(logits)
    if splits < 1 or n < splits:
        raise MetricsError(f"the Inception Score needs at least one image per split: {n} "
                           f"images for {splits} splits")
    scores = []
    for i in range(splits):  # one split at a time: float64 [N, 1008] arrays are 400 MB at 50k
        lo, hi = i * n // splits, (i + 1) * n // splits
        log_p = _log_softmax(logits[lo:hi].astype(np.float64))  # [n_i, K]
        p = np.exp(log_p)
        log_q = np.log(p.mean(axis=0))  # [K]: log p(y) of the split
        kl = (p * (log_p - log_q)).sum(axis=1)  # [n_i]
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples ``[m, d]`` with ``k(a, b) = (a.b / d + 1)^3``:
    ``(sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (m (m - 1)) - 2 sum k(x_i, y_j) / m^2``.
    """
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3  # [m, m]
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(feats1, feats2, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: the unbiased polynomial-kernel MMD^2 averaged over random subsets (float64).

    Each of ``subsets`` rounds draws ``subset_size`` rows of each set without replacement
    (``np.random.default_rng(seed)``: first from ``feats1``, then from ``feats2``).

    Args:
      feats1, feats2: pool3 features ``[N1, d]`` and ``[N2, d]``.
      subsets: number of subsets (100 as torch-fidelity and clean-fid).
      subset_size: rows per subset (1000); both sets need at least that many.
      seed: the subsets' seed; report it with the number.

    Returns:
      (mean, std) over the subsets, std with ``ddof=0``.
    """
    x = np.asarray(feats1, np.float64)
    y = np.asarray(feats2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise MetricsError(f"KID needs features [N1, d] and [N2, d], got {x.shape} and {y.shape}")
    if subset_size < 2 or subsets < 1:
        raise MetricsError(f"KID needs subset_size >= 2 and subsets >= 1, got {subset_size} and "
                           f"{subsets}")
    if min(len(x), len(y)) < subset_size:
        raise MetricsError(f"KID subsets of {subset_size} images need at least that many in each "
                           f"set, got {len(x)} and {len(y)}: lower the subset size or add images")
    rng = np.random.default_rng(seed)
    mmds = np.empty(subsets, np.float64)
    for i in range(subsets):
        xi = x[rng.choice(len(x), subset_size, replace=False)]
        yi = y[rng.choice(len(y), subset_size, replace=False)]
        mmds[i] = polynomial_mmd2(xi, yi)
    return float(mmds.mean()), float(mmds.std())


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|a_i - b_j|^2`` float64 ``[len(a), len(b)]`` (clipped at 0 against round-off)."""
    d = (a * a).sum(axis=1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(axis=1)[None, :]
    return np.maximum(d, 0.0)


def knn_radii(features, k: int = 3, *, block: int = 1024) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row (float64 ``[N]``).

    The row itself is its own nearest neighbour (distance 0) and is not counted, as in
    Kynkäänniemi et al.'s code: the k-th entry of each row's sorted distances, 0-based.
    """
    x = np.asarray(features, np.float64)
    if not 1 <= k < len(x):
        raise MetricsError(f"k-nearest-neighbour radii need 1 <= k < N, got k={k}, N={len(x)}")
    radii = np.empty(len(x), np.float64)
    for lo in range(0, len(x), block):
        d = _squared_distances(x[lo:lo + block], x)
        radii[lo:lo + block] = np.partition(d, k, axis=1)[:, k]
    return radii


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> np.ndarray:
    """bool ``[len(points)]``: the point lies in at least one ball ``|p - c|^2 <= r``."""
    out = np.empty(len(points), bool)
    for lo in range(0, len(points), block):
        out[lo:lo + block] = (_squared_distances(points[lo:lo + block], centres)
                              <= radii[None, :]).any(axis=1)
    return out


def precision_recall(real_features, fake_features, *, k: int = 3,
                     block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), float64.

    Each set's manifold is the union of balls around its points, each ball's radius the distance
    to that point's k-th nearest neighbour in its own set. Precision: the fraction of generated
    points inside the real manifold. Recall: the fraction of real points inside the generated
    manifold. (k = 3 as in the paper and guided-diffusion's evaluator; a point on a sphere's
    surface counts as inside.)

    Args:
      real_features, fake_features: ``[N_real, d]`` and ``[N_fake, d]``.
      k: the neighbourhood size.
      block: rows per distance block (memory ``block x N`` float64).

    Returns:
      (precision, recall).
    """
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise MetricsError(f"precision / recall need features [N1, d] and [N2, d], got "
                           f"{real.shape} and {fake.shape}")
    real_radii = knn_radii(real, k, block=block)
    fake_radii = knn_radii(fake, k, block=block)
    precision = _inside(fake, real, real_radii, block).mean()
    recall = _inside(real, fake, fake_radii, block).mean()
    return float(precision), float(recall)
