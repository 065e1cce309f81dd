"""Pytrees as flat dicts keyed by their paths (``"down_0/block_0/conv1/kernel"``).

The one flattener of the package: parameter trees are compared, mapped onto other formats and
checked against checkpoints through it, so every message names a leaf the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax


def flatten(tree, sep: str = "/") -> dict[str, Any]:
    """``tree`` -> {path: leaf}, in the tree's leaf order; dict keys, attribute names and
    sequence indices joined by ``sep``."""
    return {jax.tree_util.keystr(path, simple=True, separator=sep): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(like, flat: Mapping[str, Any], sep: str = "/"):
    """The inverse of ``flatten``: ``flat``'s leaves in the structure of ``like``."""
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like),
                                        [flat[p] for p in flatten(like, sep)])
