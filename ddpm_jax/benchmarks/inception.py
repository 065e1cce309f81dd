"""Feature-extraction speed of the FID Inception, ours against torch-fidelity's.

  python -m ddpm_jax.benchmarks.inception --batch=64 [--size=32 --num_runs=3 --mode=tf1]

Both networks get the same random weights (He-scaled convolutions, identity BatchNorm: exactly
what the released weights cost) and the same uint8 ``[batch, size, size, 3]`` images:

* ours: ``ddpm_jax.metrics.inception_features`` on a temporary converted file, one batch of
  ``--batch`` images per call, host to host (upload, resize, network, download); the first
  call (load and compile) is reported apart, then the median of ``--num_runs`` calls after
  ``--warmup`` more;
* torch-fidelity 0.4.0's ``FeatureExtractorInceptionV3`` (when torch and torch-fidelity are
  installed: ``pip install --no-deps torch-fidelity==0.4.0``) on the same batch, NCHW, under
  ``torch.no_grad``, with torch's default threads; same timing.

One JSON line per contender, then one with the ratio (ours / theirs, in images/s). FLOP/s use
11.42 GFLOP per 299x299 image (PyTorch's flop counter on the network, 2 FLOP per multiply-add).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable

import jax
import numpy as np
from absl import app, flags

from ddpm_jax.benchmarks import common
from ddpm_jax.metrics import inception, network, weights

GFLOPS_PER_IMAGE = 11.42
TORCH_FEATURES = ("2048", "logits_unbiased", "logits")
FLAGS = flags.FLAGS



def define_flags() -> None:
    """The command's flags (defined only when run as a program, so importing this module for
    its helpers registers nothing)."""
    flags.DEFINE_integer("batch", 64, "Images per call.", lower_bound=1)
    flags.DEFINE_integer("size", 32, "Height and width of the uint8 input images.")
    flags.DEFINE_enum("mode", "tf1", list(network.MODES), "Preprocessing of ours.")
    flags.DEFINE_integer("num_runs", 3, "Timed calls (the median is reported).")
    flags.DEFINE_integer("warmup", 1, "Untimed calls after the first.")
    flags.DEFINE_integer("seed", 0, "Seed of the weights and images.")
    flags.DEFINE_bool("vs_torch", True, "Also time torch-fidelity's extractor.")


def random_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """The 472 tensors (PyTorch names and layout) with random He-scaled convolutions, identity
    BatchNorm statistics and a random fc layer: float32."""
    rng = np.random.default_rng(seed)
    normal = lambda shape, scale: rng.standard_normal(shape, np.float32) * np.float32(scale)
    out = {}
    for name, shape in weights.expected_tensors().items():
        leaf = name.rsplit(".", 1)[1]
        if leaf in ("running_mean", "bias"):
            out[name] = normal(shape, 0.1)
        elif leaf in ("running_var",):
            out[name] = np.ones(shape, np.float32)
        elif name.endswith("bn.weight"):
            out[name] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:  # conv or fc weight [out, in, ...]
            out[name] = normal(shape, np.sqrt(2.0 / int(np.prod(shape[1:]))))
    return out


def import_torch_fidelity(*names: str) -> list[types.ModuleType]:
    """Imports torch-fidelity modules without its package ``__init__`` (which needs torchvision):
    a bare package stands in for it, and a stub ``torch_fidelity.utils`` for the torchvision-
    bound helpers that the metric modules import but their pure functions never call."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            raise ImportError("torch-fidelity is not installed: pip install --no-deps "
                              "torch-fidelity==0.4.0")
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    if "torch_fidelity.utils" not in sys.modules:
        utils = types.ModuleType("torch_fidelity.utils")

        def unavailable(*args, **kwargs):
            raise NotImplementedError("torch_fidelity.utils is stubbed (no torchvision)")

        for helper in ("get_cacheable_input_name", "cache_lookup_one_recompute_on_miss",
                       "extract_featuresdict_from_input_id_cached", "create_feature_extractor",
                       "resolve_feature_extractor", "resolve_feature_layer_for_metric"):
            setattr(utils, helper, unavailable)
        sys.modules["torch_fidelity.utils"] = utils
    return [importlib.import_module(n) for n in names]


def have_torch_fidelity() -> bool:
    """Whether torch and torch-fidelity are installed (without importing either)."""
    return "torch_fidelity" in sys.modules or all(
        importlib.util.find_spec(m) is not None for m in ("torch", "torch_fidelity"))


def save_pth(tensors: dict[str, np.ndarray], path: str) -> None:
    """Writes the tensors as a PyTorch state dict (with the BatchNorm ``num_batches_tracked``
    counters that a strict ``load_state_dict`` expects)."""
    import torch  # noqa: PLC0415

    state = {}
    for name, value in tensors.items():
        state[name] = torch.from_numpy(np.array(value))
        if name.endswith("bn.running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    torch.save(state, path)


def torch_fidelity_extractor(pth: str):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (pool3 and both logits) built from a
    state dict file; the file is read with ``torch.load(weights_only=True)``."""
    import torch  # noqa: PLC0415

    (module,) = import_torch_fidelity("torch_fidelity.feature_extractor_inceptionv3")
    load = torch.load

    def safe_load(f, *args, **kwargs):
        return load(f, map_location="cpu", weights_only=True)

    torch.load = safe_load
    try:
        return module.FeatureExtractorInceptionV3(
            "inception-v3-compat", list(TORCH_FEATURES), feature_extractor_weights_path=pth)
    finally:
        torch.load = load


def timed(fn: Callable[[], object], num_runs: int, warmup: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of ``num_runs`` calls after ``warmup``)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    return first, common.median_seconds(fn, num_runs, warmup)


def record(name: str, batch: int, first: float, median: float, **extra) -> dict:
    """One JSON record of a contender."""
    return dict(benchmark="inception", contender=name, batch=batch, size=FLAGS.size,
                first_call_s=first, batch_s=median, images_per_s=batch / median,
                gflops_per_s=GFLOPS_PER_IMAGE * batch / median, **extra)


def measure_ours(path: str, images: np.ndarray) -> dict:
    """Times ``inception_features`` on one batch of ``images``."""
    batch = len(images)
    first, median = timed(
        lambda: inception.inception_features(images, weights=path, mode=FLAGS.mode,
                                             batch_size=batch),
        FLAGS.num_runs, FLAGS.warmup)
    return record("ddpm_jax", batch, first, median, mode=FLAGS.mode,
                  platform=jax.devices()[0].platform, devices=jax.device_count())


def measure_torch(pth: str, images: np.ndarray) -> dict:
    """Times torch-fidelity's extractor on the same batch (NCHW uint8, ``torch.no_grad``)."""
    import torch  # noqa: PLC0415

    extractor = torch_fidelity_extractor(pth)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def run():
        with torch.no_grad():
            return extractor(x)

    first, median = timed(run, FLAGS.num_runs, FLAGS.warmup)
    return record("torch-fidelity", len(images), first, median, mode="tf1",
                  torch=torch.__version__, threads=torch.get_num_threads())


def main(argv) -> None:
    """Writes the weights to a temporary directory, times both contenders, prints JSON lines."""
    del argv
    tensors = random_tensors(FLAGS.seed)
    rng = np.random.default_rng(FLAGS.seed + 1)
    images = rng.integers(0, 256, (FLAGS.batch, FLAGS.size, FLAGS.size, 3), dtype=np.uint8)
    vs_torch = FLAGS.vs_torch and have_torch_fidelity()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "random_inception.safetensors")
        weights.save_tensors(tensors, path, "random-weights")
        ours = measure_ours(path, images)
        print(json.dumps(ours), flush=True)
        if not vs_torch:
            return
        pth = os.path.join(tmp, "random_inception.pth")
        save_pth(tensors, pth)
        theirs = measure_torch(pth, images)
        print(json.dumps(theirs), flush=True)
    print(json.dumps(dict(benchmark="inception", contender="ratio", batch=FLAGS.batch,
                          ours_over_theirs=ours["images_per_s"] / theirs["images_per_s"])))


if __name__ == "__main__":
    define_flags()
    app.run(main)
