"""Converts pytorch-fid's Inception weights to the safetensors file the metrics read.

  python -m ddpm_jax.metrics.convert --source=pt_inception-2015-12-05-6726825d.pth \
      --out=~/inception/fid_inception_v3.safetensors
  python -m ddpm_jax.metrics.convert --download --out=~/inception/fid_inception_v3.safetensors

The source's SHA-256 must start with ``6726825d`` (pytorch-fid's and torch-fidelity's released
file) unless ``--allow_other_weights`` is given: other weights of the same names and shapes
(tests use random ones) convert, but their FID is not comparable with anyone's. The 472 float32
tensors (``num_batches_tracked`` counters skipped) are checked by name and shape and written bit
for bit under their PyTorch names, with the source's SHA-256 in the metadata. ``--download``
fetches the file from pytorch-fid's release first (where there is a network).

The ``.pth`` is a pickle: it is read with ``torch.load(weights_only=True)`` (tensors only, no
code) by ``weights.pytorch``, the package's one PyTorch reader; torch is needed for this step
only (``pip install 'ddpm_jax[torch]'``). Then point ``--inception_weights`` or
``DDPM_JAX_INCEPTION_WEIGHTS`` at the output.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request

import numpy as np

from ddpm_jax.metrics import weights
from ddpm_jax.metrics.errors import MetricsError
from ddpm_jax.weights import pytorch

CHUNK = 1 << 20


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_pth(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict file -> ``{name: numpy array}`` without the BatchNorm
    ``num_batches_tracked`` counters (``weights.pytorch``: ``torch.load(weights_only=True)``)."""
    return {name: value for name, value in pytorch.read_state_dict(path).items()
            if not name.endswith("num_batches_tracked")}


def convert_file(source: str, out: str, *, allow_other_weights: bool = False) -> dict:
    """Checks and converts ``source`` (.pth) into ``out`` (.safetensors).

    Returns:
      ``source``, ``out``, ``sha256`` (of the source), ``official`` (its prefix is pytorch-fid's),
      ``num_tensors``.

    Raises:
      MetricsError: no source, a hash other than pytorch-fid's (without
        ``allow_other_weights``), or a missing or misshapen tensor.
      weights.layout.WeightsError: no torch, or a ``.pth`` torch cannot read.
    """
    if not os.path.isfile(source):
        raise MetricsError(f"no weight file at {source}: download {weights.SOURCE_URL} or use "
                           "--download")
    if os.path.abspath(source) == os.path.abspath(out):
        raise MetricsError(f"--out must differ from --source ({out})")
    sha = file_sha256(source)
    official = weights.is_official(sha)
    if not official and not allow_other_weights:
        raise MetricsError(
            f"{source} has SHA-256 {sha[:16]}..., not pytorch-fid's "
            f"{weights.OFFICIAL_SHA256_PREFIX}...: pass the released {weights.SOURCE_FILE}, or "
            "--allow_other_weights for other weights of the same shapes (their scores compare "
            "with no one's)")
    weights.save_tensors(read_pth(source), out, sha)
    return dict(source=source, out=out, sha256=sha, official=official,
                num_tensors=weights.NUM_TENSORS)


def download(url: str, dest: str, *, timeout: float = 60.0) -> str:
    """Downloads ``url`` to ``dest`` (through ``dest.part``); returns ``dest``."""
    part = f"{dest}.part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            for block in iter(lambda: response.read(CHUNK), b""):
                f.write(block)
    except (urllib.error.URLError, OSError, ValueError) as e:
        if os.path.exists(part):
            os.remove(part)
        reason = getattr(e, "reason", None) or e
        raise MetricsError(f"cannot download {url} ({reason}): download it on a machine with a "
                           "network and convert it with --source=FILE") from None
    os.replace(part, dest)
    return dest


def download_and_convert(out: str, *, url: str = weights.SOURCE_URL) -> dict:
    """Downloads pytorch-fid's weights, checks their hash and converts them into ``out``; the
    downloaded ``.pth`` is deleted afterwards."""
    pth = download(url, f"{out}.download.pth")
    try:
        return convert_file(pth, out)
    finally:
        os.remove(pth)


def _flags():
    from absl import flags  # noqa: PLC0415

    flags.DEFINE_string("source", None, f"pytorch-fid's {weights.SOURCE_FILE}.")
    flags.DEFINE_string("out", None, "The .safetensors file to write.")
    flags.DEFINE_bool("download", False, "Download the source from pytorch-fid's release first.")
    flags.DEFINE_string("url", weights.SOURCE_URL, "Where --download fetches the weights.")
    flags.DEFINE_bool("allow_other_weights", False, "Convert weights whose SHA-256 is not "
                      "pytorch-fid's (same names and shapes; for tests).")
    flags.mark_flag_as_required("out")
    return flags.FLAGS


def convert_command(*, out: str, source: str | None = None, download_source: bool = False,
                    url: str = weights.SOURCE_URL, allow_other_weights: bool = False) -> dict:
    """What the command does: converts ``source``, or downloads and converts (exactly one)."""
    if download_source == (source is not None):
        raise MetricsError("give exactly one of --source=PTH and --download")
    out = os.path.expanduser(out)
    if download_source:
        return download_and_convert(out, url=url)
    return convert_file(os.path.expanduser(source), out, allow_other_weights=allow_other_weights)


def main() -> None:
    """The command: flags -> ``convert_command`` -> a summary (errors: one line, exit 2)."""
    from absl import flags  # noqa: PLC0415

    f = flags.FLAGS
    info = convert_command(out=f.out, source=f.source, download_source=f.download, url=f.url,
                           allow_other_weights=f.allow_other_weights)
    kind = "pytorch-fid's weights" if info["official"] else "OTHER weights (not pytorch-fid's)"
    print(f"converted {info['num_tensors']} tensors of {kind}, sha256 {info['sha256']}\n"
          f"  written:  {info['out']}\n  use with: --inception_weights={info['out']} or "
          f"{weights.ENV_VAR}={info['out']}", flush=True)


if __name__ == "__main__":
    from ddpm_jax import cli

    _flags()
    cli.run(main)
