"""The torch-free check's reference (tests/data/inception_reference.npz): torch-fidelity's FID
Inception outputs for two fixed images under weights drawn from a seed (``weights``). Run with
the torch extra and torch-fidelity to write the file again:

  python tests/scripts/inception_reference.py tests/data/inception_reference.npz
"""

import os
import sys

import numpy as np

SEED, IMAGE_SEED = 3, 4
OUTPUTS = ("pool3", "logits_unbiased", "logits")
REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                         "inception_reference.npz")


def reference() -> dict[str, np.ndarray]:
    """The committed outputs (``REFERENCE``)."""
    with np.load(REFERENCE, allow_pickle=False) as f:
        return {k: f[k] for k in OUTPUTS}


def weights() -> dict[str, np.ndarray]:
    """The 472 tensors (PyTorch names): ``benchmarks.inception.random_tensors(SEED)`` with
    BatchNorm affines in [0.5, 1] (activations stay of order one without calibration)."""
    from ddpm_jax.benchmarks import inception as bench

    tensors = bench.random_tensors(seed=SEED)
    rng = np.random.default_rng(SEED + 1)
    for name in tensors:
        if name.endswith(("bn.weight", "bn.bias")):
            tensors[name] = rng.uniform(0.5, 1.0, tensors[name].shape).astype(np.float32)
    return tensors


def images() -> np.ndarray:
    return np.random.default_rng(IMAGE_SEED).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)


def torch_outputs(pth: str) -> dict[str, np.ndarray]:
    import torch

    from ddpm_jax.benchmarks import inception as bench

    bench.save_pth(weights(), pth)
    extractor = bench.torch_fidelity_extractor(pth).eval()
    with torch.no_grad():
        out = extractor(torch.from_numpy(images()).permute(0, 3, 1, 2).contiguous())
    return {k: v.numpy().astype(np.float32) for k, v in zip(OUTPUTS, out, strict=True)}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        arrays = torch_outputs(os.path.join(tmp, "w.pth"))
    np.savez(sys.argv[1], **arrays)
    print({k: v.shape for k, v in arrays.items()})
