"""LSUN cat 256x256 (113.7M parameters, 1.8M steps, FID 19.75; no flips).

  python train.py --config=configs/lsun_cat.py --workdir=runs/lsun_cat

The 256x256 model and optimiser of configs/celebahq.py on LSUN cat.
"""

from configs import celebahq


def get_config():
    config = celebahq.get_config()
    config.data.dataset = "lsun/cat"
    config.data.random_flip = False
    config.data.eval_split = "validation"  # LSUN has train and validation splits
    config.training.num_train_steps = 1_800_000
    return config
