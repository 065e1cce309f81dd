"""CelebA-HQ 256x256 (113.7M parameters, 0.5M steps).

  python train.py --config=configs/celebahq.py --workdir=runs/celebahq

celeb_a_hq needs a manual download: see the README's 'Datasets' section.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "celeb_a_hq/256"
    config.data.image_size = 256
    config.data.random_flip = True
    config.model.ch = 128
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0
    config.optim.lr = 2e-5
    config.optim.warmup = 5000
    config.training.batch_size = 64
    config.training.num_train_steps = 500_000
    # The mse loss does not use the variance; the paper samples its 256px models with beta~_t.
    config.diffusion.model_var_type = "fixedsmall"
    config.data.eval_split = "train"  # celeb_a_hq has only a train split
    config.sampling.batch_size = 64
    config.lock()
    return config
