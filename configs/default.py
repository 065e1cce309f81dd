"""Shared defaults: the paper's CIFAR10 settings. Every experiment config starts from these.

  python train.py --config=configs/cifar10.py --workdir=runs/cifar10
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "cifar10"
    data.image_size = 32
    data.channels = 3
    data.random_flip = True
    data.data_dir = config_dict.placeholder(str)  # None: tfds' default (~/tensorflow_datasets)
    data.split = "train"
    data.eval_split = "test"
    data.prefetch = 2  # batches prepared ahead of the devices
    data.num_threads = 4  # host threads decoding and preprocessing

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.block_size = 1  # space-to-depth factor (memory saving for 256px models)
    model.dtype = "float32"  # activation dtype; parameters are always float32
    # GroupNorm groups of every norm: the paper's 32. With ch = 32 a group is one channel, and
    # the norm after a block's time-embedding shift removes that shift (configs/digits.py).
    model.num_groups = 32
    # Class conditioning: 0 = unconditional (the paper's model). K > 0: a label embedding of K
    # classes plus a learned null class; during training a label becomes the null class with
    # probability cond_drop_prob (classifier-free guidance; 0.1 in Ho and Salimans 2021).
    model.num_classes = 0
    model.cond_drop_prob = 0.1

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.num_timesteps = 1000
    diffusion.beta_schedule = "linear"
    diffusion.beta_start = 1e-4
    diffusion.beta_end = 0.02
    diffusion.model_mean_type = "eps"
    diffusion.model_var_type = "fixedlarge"
    diffusion.loss_type = "mse"

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 2e-4
    optim.warmup = 5000
    optim.grad_clip = 1.0
    optim.ema_decay = 0.9999
    optim.ema_warmup = False  # True: decay min(ema_decay, (1 + step) / (10 + step)) (TF's)
    optim.schedule = "constant"  # after the warm-up; "cosine": a half cosine down to 0
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    # False: a non-finite loss or gradient stops the run (naming the step). True: such steps are
    # skipped (no update, counted in the logs) and training goes on.
    optim.skip_nonfinite = False

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128  # global, over all devices and processes
    training.num_train_steps = 800_000
    training.log_every = 100
    training.checkpoint_every = 10_000
    training.sample_every = 50_000
    training.max_to_keep = 3
    training.num_sample_images = 64  # images in each training-time sample grid
    # Train steps per compiled call (a loop over k stacked batches): fewer dispatches, the same
    # state as k single steps. log_every, checkpoint_every and sample_every must be multiples.
    training.steps_per_dispatch = 1

    config.sampling = sampling = ml_collections.ConfigDict()
    # Samplers and spacings: ddpm_jax/config_lib.py SAMPLERS / SPACINGS, the README's tables.
    sampling.sampler = "ancestral"
    sampling.num_steps = config_dict.placeholder(int)  # None: the sampler's own (ancestral: T)
    sampling.spacing = config_dict.placeholder(str)  # None: the sampler's own
    sampling.eta = 0.0  # DDIM samplers only
    sampling.clip_denoised = True  # the ancestral sampler clips its predicted x_0 (as the paper)
    sampling.thresholding = False  # the DPM-Solvers clip their predicted x_0
    sampling.churn = 0.0  # heun only: EDM's S_churn (0 = its deterministic sampler)
    sampling.batch_size = 256
    # Classifier-free guidance w of class-conditional sampling (training grids, and sample.py
    # --labels without --guidance): eps = (1 + w) eps(x, y) - w eps(x, null); 0 = no guidance.
    sampling.guidance = 0.0

    # Evaluation during training (ddpm_jax.evaluation), on the EMA weights.
    config.eval = ev = ml_collections.ConfigDict()
    ev.metrics = ""  # comma list of digits_fd, precision, recall, fid, is; "" = none
    ev.every_steps = 0  # and at the last step; 0 = only at the last step
    ev.num_samples = 1000
    ev.sampler = config_dict.placeholder(str)  # None: config.sampling.sampler (and num_steps)
    ev.num_steps = config_dict.placeholder(int)
    ev.best_metric = ""  # keep the best checkpoint (WORKDIR/best/) by this row key; "" = none
    ev.wandb = False  # also send every row to Weights & Biases (the wandb extra)
    ev.wandb_project = "ddpm_jax"
    return config
