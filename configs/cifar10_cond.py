"""CIFAR10 32x32, class-conditional with classifier-free guidance: the paper's model and
settings (configs/cifar10.py) plus a label embedding of the 10 classes and a null class.

  python train.py --config=configs/cifar10_cond.py --workdir=runs/cifar10_cond
  python sample.py --workdir=runs/cifar10_cond --num_samples=50000 --labels=all --guidance=0.3

Labels are dropped to the null class with probability 0.1 (Ho and Salimans 2021, their best on
ImageNet 64x64); sampling.guidance w = 0.3 is their setting for the best FID at 128x128, not a
value measured here on CIFAR10.
"""

from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.unlock()
    config.model.num_classes = 10
    config.model.cond_drop_prob = 0.1
    config.sampling.guidance = 0.3
    config.lock()
    return config
