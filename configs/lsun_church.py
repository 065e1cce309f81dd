"""LSUN church_outdoor 256x256 (113.7M parameters, 1.2M steps, FID 7.89).

  python train.py --config=configs/lsun_church.py --workdir=runs/lsun_church

The 256x256 model and optimiser of configs/celebahq.py on LSUN church_outdoor.
"""

from configs import celebahq


def get_config():
    config = celebahq.get_config()
    config.data.dataset = "lsun/church_outdoor"
    config.data.eval_split = "validation"  # LSUN has train and validation splits
    config.training.num_train_steps = 1_200_000
    return config
