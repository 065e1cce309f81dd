"""LSUN bedroom 256x256 (113.7M parameters, 2.4M steps, FID 6.36).

  python train.py --config=configs/lsun_bedroom.py --workdir=runs/lsun_bedroom

The 256x256 model and optimiser of configs/celebahq.py on LSUN bedroom.
"""

from configs import celebahq


def get_config():
    config = celebahq.get_config()
    config.data.dataset = "lsun/bedroom"
    config.data.eval_split = "validation"  # LSUN has train and validation splits
    config.training.num_train_steps = 2_400_000
    return config
