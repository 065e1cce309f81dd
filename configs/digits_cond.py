"""The quick start, class-conditional: the embedded digits with classifier-free guidance.

  python train.py --config=configs/digits_cond.py --workdir=runs/digits_cond
  python sample.py --workdir=runs/digits_cond --num_samples=100 --labels=all --guidance=1

The digits config (configs/digits.py) with a label embedding for the 10 digits plus a learned
null class; a label is dropped to the null class with probability 0.1 (Ho and Salimans 2021),
so one network gives both eps(x, y) and eps(x, null). The training grids show the digits 0-9 in
turn, guided with w = sampling.guidance.
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.unlock()
    config.model.num_classes = 10
    config.model.cond_drop_prob = 0.1
    config.sampling.guidance = 1.0
    config.lock()
    return config
