"""CIFAR10 32x32, the paper's main model (35.7M parameters, 800k steps, FID 3.17).

  python train.py --config=configs/cifar10.py --workdir=runs/cifar10
"""

from configs import default


def get_config():
    # Every value below is the paper's (reference run script); most equal the defaults.
    config = default.get_config()
    config.data.dataset = "cifar10"
    config.data.image_size = 32
    config.data.random_flip = True
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.optim.lr = 2e-4
    config.optim.warmup = 5000
    config.training.batch_size = 128
    config.training.num_train_steps = 800_000
    config.diffusion.model_var_type = "fixedlarge"
    config.lock()
    return config
