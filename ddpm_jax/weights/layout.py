"""One layout-mapping engine for weights in other formats.

A plan maps each leaf of our parameter tree (``trees.flatten`` paths) to its source tensor names
and a ``Transform`` (the source array layout); ``plan`` builds one from a function naming each of
our layers in the source. ``fit`` accounts for named source tensors against a plan (each used
exactly once, every shape right), ``convert`` reads a source through it and ``unconvert`` writes
our tree through the same plan, so ``convert(unconvert(p))`` is ``p`` bit for bit. The formats
(``weights.diffusers``, ``weights.tf``, and the FID Inception's file in ``metrics.weights``) only
supply plans and readers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import ml_collections
import numpy as np

from ddpm_jax import errors, trees, unet


class WeightsError(errors.UserError, ValueError):
    """A source checkpoint that does not fit the config; the message names what differs."""


# -- layouts -------------------------------------------------------------------------------------
class Transform(NamedTuple):
    """A source array layout: ``to_ours`` turns a source array into ours, ``from_ours`` back.

    Both are pure axis permutations or reshapes, so ``to_ours(from_ours(a))`` is ``a`` bit for
    bit; import and export use the same ``Transform`` in opposite directions.
    """

    to_ours: Callable[[np.ndarray], np.ndarray]
    from_ours: Callable[[np.ndarray], np.ndarray]

    def source_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The source shape of an array of our ``shape`` (computed on a stride-0 view)."""
        return tuple(self.from_ours(np.broadcast_to(np.float32(0), tuple(shape))).shape)


# A plan: our leaf path -> (source tensor names, in the order to try; layout).
Plan = Mapping[str, tuple[tuple[str, ...], Transform]]

SAME = Transform(lambda a: a, lambda a: a)
# PyTorch conv [out, in, kh, kw] <-> Flax [kh, kw, in, out].
TORCH_CONV = Transform(lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
# PyTorch linear [out, in] <-> [in, out].
TORCH_LINEAR = Transform(lambda a: a.T, lambda a: a.T)
# PyTorch 1x1 conv [out, in, 1, 1] <-> dense [in, out] (diffusers' conv_shortcut).
TORCH_CONV1X1 = Transform(lambda a: a[:, :, 0, 0].T, lambda a: a.T[:, :, None, None])

# A layer: our leaf -> (torch leaf, layout).
CONV = {"kernel": ("weight", TORCH_CONV), "bias": ("bias", SAME)}
LINEAR = {"kernel": ("weight", TORCH_LINEAR), "bias": ("bias", SAME)}
CONV1X1 = {"kernel": ("weight", TORCH_CONV1X1), "bias": ("bias", SAME)}
NORM = {"scale": ("weight", SAME), "bias": ("bias", SAME)}
# torch.nn.Embedding stores [num_embeddings, dim], as ours (the null class is the last row).
EMBED = {"embedding": ("weight", SAME)}
# torch.nn.BatchNorm2d's affine parameters and running statistics.
BATCH_NORM = {"scale": ("weight", SAME), "bias": ("bias", SAME), "mean": ("running_mean", SAME),
              "var": ("running_var", SAME)}


# -- plans ---------------------------------------------------------------------------------------
def expected_params(config: ml_collections.ConfigDict):
    """The config's U-Net parameter tree as ShapeDtypeStructs (memoised: tracing takes seconds)."""
    return _expected_params(unet.ModelSpec.from_config(config))


@functools.lru_cache(maxsize=4)
def _expected_params(model: unet.ModelSpec):
    return unet.abstract_model(model)[1]


def plan(expected, layer: Callable[[str], tuple[tuple[str, ...], Mapping]], *,
         sep: str = ".") -> dict[str, tuple[tuple[str, ...], Transform]]:
    """Our leaf path -> (source tensor names, layout) for every leaf of ``expected``.

    Args:
      expected: our parameter tree (arrays or ShapeDtypeStructs).
      layer: our layer's scope (``down_0/block_0/conv1``) -> (its source module names, in the
        order to try; its table {our leaf: (source leaf, layout)}, such as ``CONV``).
      sep: what joins a source module name and its leaf.
    """
    out = {}
    for path in trees.flatten(expected):
        scope, leaf = path.rsplit("/", 1)
        modules, table = layer(scope)
        source_leaf, layout = table[leaf]
        out[path] = (tuple(f"{m}{sep}{source_leaf}" for m in modules), layout)
    return out


def source_shapes(plan: Plan, expected) -> dict[str, tuple[int, ...]]:
    """The source tensors a plan reads: first name -> source shape, in our leaf order."""
    flat = trees.flatten(expected)
    return {names[0]: layout.source_shape(tuple(flat[path].shape))
            for path, (names, layout) in plan.items()}


def listing(items: list[str], limit: int = 6) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# -- the converter -------------------------------------------------------------------------------
class Fit(NamedTuple):
    """How named source tensors fit a plan (``fit``); they fit when every list is empty.

    ``chosen``: our path -> (source name, layout); ``wrong``: (source name, its shape, the
    shape the plan needs, our path, our shape); ``missing``: (first source name, the shape it
    needs); ``unused``: source names no leaf reads, sorted.
    """

    chosen: dict[str, tuple[str, Transform]]
    wrong: list[tuple[str, tuple, tuple, str, tuple]]
    missing: list[tuple[str, tuple]]
    unused: list[str]


def fit(plan: Plan, shapes: Mapping[str, tuple[int, ...]], expected) -> Fit:
    """Accounts for the source tensors ``shapes`` (name -> shape) against ``plan``: each of our
    leaves takes the first of its names that the source holds."""
    chosen, seen, wrong, missing = {}, set(), [], []
    for path, want in trees.flatten(expected).items():
        names, layout = plan[path]
        name = next((n for n in names if n in shapes), None)
        want_src = tuple(layout.source_shape(tuple(want.shape)))
        if name is None:
            missing.append((names[0], want_src))
            continue
        seen.add(name)
        if tuple(shapes[name]) != want_src:
            wrong.append((name, tuple(shapes[name]), want_src, path, tuple(want.shape)))
        else:
            chosen[path] = (name, layout)
    return Fit(chosen, wrong, missing, sorted(set(shapes) - seen))


def read(fitted: Fit, get: Callable[[str], np.ndarray], expected) -> dict:
    """Our tree (float32 numpy, our layouts) of the source tensors a complete ``Fit`` chose."""
    flat = {path: np.ascontiguousarray(layout.to_ours(np.asarray(get(name), np.float32)))
            for path, (name, layout) in fitted.chosen.items()}
    return trees.unflatten(expected, flat)


def convert(
    plan: Plan,
    shapes: Mapping[str, tuple[int, ...]],
    get: Callable[[str], np.ndarray],
    expected,
    *,
    what: str,
) -> dict:
    """Fills the config's parameter tree from named source tensors, each used exactly once.

    Args:
      plan: our leaf path -> (source names to try, in order; layout).
      shapes: the source tensors to account for: name -> shape.
      get: name -> array (called only once every shape has been checked).
      expected: the target tree (``expected_params(config)``).
      what: the source, for messages.

    Returns:
      The parameters as the plain nested dict of float32 arrays ``unet.split`` gives.

    Raises:
      WeightsError: one line naming wrong shapes, missing and unused tensors.
    """
    fitted = fit(plan, shapes, expected)
    wrong = [f"{name} has shape {have} but the config needs {want} (our {path} {ours})"
             for name, have, want, path, ours in fitted.wrong]
    problems = wrong[:6] + ([f"... ({len(wrong)} wrong shapes in all)"] if len(wrong) > 6 else [])
    if fitted.missing:
        problems.append(f"missing {listing([f'{n} {s}' for n, s in fitted.missing])}")
    if fitted.unused:
        problems.append(f"unused {listing([f'{n} {tuple(shapes[n])}' for n in fitted.unused])}")
    if problems:
        raise WeightsError(f"{what} does not fit the config: {'; '.join(problems)}")
    return read(fitted, get, expected)


def unconvert(
    plan: Plan,
    params,
    expected,
    *,
    what: str,
) -> dict[str, np.ndarray]:
    """The inverse of ``convert``: our parameter tree -> named source tensors (float32 numpy).

    Each parameter goes, in the source layout, to the first (current) name of its plan entry;
    the same plan and ``Transform`` that import read it, so ``convert(unconvert(p))`` is ``p``
    bit for bit.

    Args:
      plan: our leaf path -> (source names, layout), as for ``convert``.
      params: our parameter tree.
      expected: the config's tree (``expected_params(config)``) that ``params`` must match.
      what: the parameters, for messages.

    Raises:
      WeightsError: a parameter missing from ``params``, an extra one, or a wrong shape.
    """
    flat, want = trees.flatten(params), trees.flatten(expected)
    problems = [f"{path} has shape {tuple(np.shape(flat[path]))} but the config needs "
                f"{tuple(want[path].shape)}" for path in sorted(flat.keys() & want.keys())
                if tuple(np.shape(flat[path])) != tuple(want[path].shape)]
    if want.keys() - flat.keys():
        problems.append(f"missing {listing(sorted(want.keys() - flat.keys()))}")
    if flat.keys() - want.keys():
        problems.append(f"unexpected {listing(sorted(flat.keys() - want.keys()))}")
    if problems:
        raise WeightsError(f"{what} do not fit the config: {'; '.join(problems)}")
    out: dict[str, np.ndarray] = {}
    for path in want:
        names, layout = plan[path]
        if names[0] in out:  # the mapping must be one to one
            raise AssertionError(f"two parameters map to the source tensor {names[0]}")
        out[names[0]] = np.ascontiguousarray(layout.from_ours(np.asarray(flat[path], np.float32)))
    return out
