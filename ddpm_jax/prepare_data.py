"""Downloads and prepares an experiment's dataset as tfds ArrayRecord files, once.

  python -m ddpm_jax.prepare_data --config=configs/cifar10.py [--config.data.data_dir=DIR]

The files go to `config.data.data_dir` (default: tfds' `~/tensorflow_datasets`), where the
training reader looks for them. `celeb_a_hq/256` cannot be downloaded by tfds: put
`data256x256.tar` (built with github.com/tkarras/progressive_growing_of_gans) in
`<data_dir>/downloads/manual/` first, or name its folder with `--manual_dir`. The embedded
`digits` dataset needs no network. TensorFlow, which tfds uses to prepare, is kept off the GPUs.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from ddpm_jax import cli, datasets

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder of manually downloaded files (default <data_dir>/downloads/manual)."
)


def main() -> None:
    """Prepares the dataset of --config and prints where it is and its split sizes."""
    config = _CONFIG.value
    data = datasets.DataSpec.from_config(config)
    builder = datasets.prepare_dataset(data, manual_dir=_MANUAL_DIR.value)
    splits = builder.info.splits.items()
    sizes = ", ".join(f"{name} {info.num_examples:,}" for name, info in splits)
    print(f"{config.data.dataset} is ready in {builder.data_dir} ({sizes})")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main)
