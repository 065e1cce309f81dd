"""A tiny configuration for the test suite (seconds per step on one CPU core).

  python train.py --config=configs/test.py --workdir=/tmp/ddpm_test
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.random_flip = False
    config.data.num_threads = 1
    # One resolution at 64 channels: no down- or upsampling (the U-Net's full layout is tested
    # on the paper's configs, tests/test_unet.py, and against diffusers,
    # tests/test_import_weights.py), and a train step compiles in half the time of ch 32,
    # ch_mult (1, 2), attention at 4x4 (5.1 s against 10 s); the suite compiles dozens. 64, not 32:
    # with GroupNorm's 32 groups, 32 channels make one channel per group, and the normalisation
    # after the time embedding's per-channel shift would remove it (the network could not see t).
    config.model.ch = 64
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.dropout = 0.1
    config.diffusion.num_timesteps = 50
    config.diffusion.beta_end = 0.2  # keeps alphabar_T ~ 0 with only 50 steps
    config.optim.lr = 1e-3
    config.optim.warmup = 2
    config.optim.ema_decay = 0.9
    config.training.batch_size = 8
    config.training.num_train_steps = 4
    config.training.log_every = 1
    config.training.checkpoint_every = 2
    config.training.sample_every = 4
    config.training.num_sample_images = 4
    config.sampling.batch_size = 8
    config.lock()
    return config
