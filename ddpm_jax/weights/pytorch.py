"""The one reader of PyTorch pickles: ``torch.load(weights_only=True)``, tensors only, no code.

Both the diffusers ``diffusion_pytorch_model.bin`` and pytorch-fid's Inception ``.pth`` are read
here; torch is imported only when such a file is read (the ``torch`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from etils import epath

from ddpm_jax import errors
from ddpm_jax.weights.layout import WeightsError

TORCH_EXTRA = "pip install 'ddpm_jax[torch]'"


def read_state_dict(path) -> dict[str, np.ndarray]:
    """A PyTorch state dict file -> {name: numpy array} (bfloat16 read as float32, exactly).

    Raises:
      WeightsError: no torch, an unreadable file, or one that is not a dict of tensors.
    """
    try:
        import torch  # noqa: PLC0415 - only PyTorch files need torch
    except ImportError:
        raise WeightsError(
            f"{path} is a PyTorch pickle, read only with torch.load(weights_only=True): install "
            f"torch ({TORCH_EXTRA}; the CPU build is enough), or use a .safetensors copy of it"
        ) from None
    try:
        with epath.Path(path).open("rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one line
        raise WeightsError(f"cannot read {path} with torch.load(weights_only=True): "
                           f"{errors.first_line(e)}") from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    out = {}
    for name, value in state.items():
        if not torch.is_tensor(value):
            raise WeightsError(f"entry {name} of {path} is a {type(value).__name__}, not a "
                               "tensor")
        value = value.detach().cpu()
        out[str(name)] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return out
