"""diffusers models on the Hugging Face Hub by name: ``hf://owner/name[@revision]``.

``hub_snapshot`` finds a model in huggingface_hub's usual cache, downloading only its config
files and the U-Net's weights when they are not there; a cached model needs no network
(``HF_HUB_OFFLINE=1``). Needs the ``hf`` extra; huggingface_hub is imported only here, on use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re

from ddpm_jax import errors
from ddpm_jax.weights.diffusers import DIFFUSERS_PICKLE, DIFFUSERS_WEIGHTS
from ddpm_jax.weights.layout import WeightsError
from ddpm_jax.weights.pytorch import TORCH_EXTRA


class HubError(WeightsError):
    """An ``hf://`` source that cannot be found or downloaded; the message says what to do."""


HUB_PREFIX = "hf://"
HUB_EXTRA = "pip install 'ddpm_jax[hf]'"
# The small files of a diffusers repository, in both layouts: pipeline folders (unet/,
# scheduler/) and the older one with the model's files at the top level.
HUB_CONFIGS = ("model_index.json", "config.json", "scheduler_config.json", "unet/config.json",
               "scheduler/scheduler_config.json")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """``hf://owner/name[@revision]`` -> (repo id, revision or None for the default branch)."""
    name, at, revision = source[len(HUB_PREFIX):].partition("@")
    if not _HUB_NAME.fullmatch(name) or (at and not revision):
        raise HubError(f"{source} is not a Hub model name: use hf://owner/name or "
                       "hf://owner/name@revision (a branch, tag or commit)")
    return name, revision or None


def _hub():
    try:
        import huggingface_hub  # noqa: PLC0415
    except ImportError:
        raise HubError(f"hf:// sources need huggingface_hub: {HUB_EXTRA}") from None
    return huggingface_hub


def _hub_error(e: Exception, hub, name: str) -> Exception:
    """The one-line HubError for a failure of ``huggingface_hub`` (``e`` itself if a bug)."""
    errs = importlib.import_module("huggingface_hub.errors")
    constants = hub.constants
    cache = constants.HF_HUB_CACHE
    not_cached = tuple(c for c in (getattr(errs, "LocalEntryNotFoundError", None),
                                   getattr(errs, "IncompleteSnapshotError", None)) if c)
    if isinstance(e, not_cached) and constants.HF_HUB_OFFLINE:
        return HubError(f"{name} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE "
                        "is set: go online and unset HF_HUB_OFFLINE to download it once (or set "
                        "HF_HUB_CACHE to a cache that holds it)")
    if isinstance(e, not_cached):
        return HubError(f"cannot download {name}: the Hugging Face Hub is out of reach and the "
                        f"cache ({cache}) does not hold it; check the network (or HF_ENDPOINT)")
    if isinstance(e, errs.RevisionNotFoundError):
        return HubError(f"{name}: the repository has no such revision; use one of its branches, "
                        "tags or commits")
    if isinstance(e, errs.RepositoryNotFoundError):
        return HubError(f"{name} is not a model on the Hugging Face Hub that this account can "
                        "read: check the name (private and gated models need `hf auth login`)")
    if isinstance(e, errs.HfHubHTTPError):
        return HubError(f"the Hugging Face Hub refused {name}: {errors.first_line(e)}")
    if isinstance(e, ValueError):  # HFValidationError: a name the Hub cannot hold
        return HubError(f"{name} is not a valid Hub model name ({errors.first_line(e)})")
    if isinstance(e, OSError):
        return HubError(f"cannot write {name} into the Hugging Face cache ({cache}): {e}; set "
                        "HF_HUB_CACHE to a writable directory")
    return e


def hub_snapshot(source: str) -> tuple[str, str]:
    """Finds ``hf://owner/name[@revision]`` in the Hugging Face cache, downloading it if needed.

    Only the config files (``HUB_CONFIGS``) and the U-Net's weights are fetched, through
    ``huggingface_hub.snapshot_download`` into its usual cache (``HF_HUB_CACHE`` or
    ``HF_HOME``), so later imports, with ``HF_HUB_OFFLINE=1`` too, read the cache alone. The
    U-Net is ``unet/`` when the repository has that folder, else its top level (the older
    layout). ``diffusion_pytorch_model.bin`` is fetched only when there is no ``.safetensors``.

    Returns:
      (the local directory holding the U-Net's config.json and weights, ``owner/name@commit``).

    Raises:
      HubError: no huggingface_hub, a bad name, not cached while offline, no such repository or
        revision, or no UNet2DModel files in it.
    """
    repo_id, revision = parse_hub_source(source)
    hub = _hub()
    name = repo_id + (f"@{revision}" if revision else "")

    def fetch(patterns) -> str:
        try:
            return hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns))
        except Exception as e:  # noqa: BLE001 - Hub failures become one line, bugs propagate
            raise _hub_error(e, hub, name) from None

    root = fetch(HUB_CONFIGS)
    folder = "unet" if os.path.exists(os.path.join(root, "unet", "config.json")) else ""
    if not os.path.exists(os.path.join(root, folder, "config.json")):
        raise HubError(f"{name} holds neither unet/config.json nor config.json: it is not a "
                       "diffusers UNet2DModel or DDPMPipeline repository")
    for weights in (DIFFUSERS_WEIGHTS, DIFFUSERS_PICKLE):
        path = f"{folder}/{weights}" if folder else weights
        if weights == DIFFUSERS_PICKLE and importlib.util.find_spec("torch") is None:
            break  # a pickle could be read only with torch; do not download it
        root = fetch([path])
        if os.path.exists(os.path.join(root, path)):
            directory = os.path.join(root, folder) if folder else root
            return directory, f"{repo_id}@{os.path.basename(root)}"
    path = f"{folder}/{DIFFUSERS_WEIGHTS}" if folder else DIFFUSERS_WEIGHTS
    if hub.constants.HF_HUB_OFFLINE:
        raise HubError(f"the cached copy of {name} lacks {path}: go online and unset "
                       "HF_HUB_OFFLINE to complete it")
    raise HubError(f"{name} holds no {path} (a {DIFFUSERS_PICKLE} needs the torch extra: "
                   f"{TORCH_EXTRA})")
