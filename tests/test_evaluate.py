"""python -m ddpm_jax.evaluate: the bound on a real split, written as JSON."""

import json
import os

import numpy as np
from conftest import run_python

from configs import test as test_config
from ddpm_jax import checkpoints, unet


def test_evaluate_writes_the_bound_of_the_test_split(digits_dir, tmp_path):
    config = test_config.get_config()
    config.data.data_dir = digits_dir
    params = unet.split(unet.create_model(config, seed=0))[1]
    checkpoints.save_weights(str(tmp_path), config, params)
    proc = run_python(["-m", "ddpm_jax.evaluate", f"--workdir={tmp_path}", "--num_examples=6",
                       "--batch_size=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(os.path.join(tmp_path, "bpd_test.json")))
    assert result["num_examples"] == 6 and result["split"] == "test"
    # total = prior + decoder + sum of the KL terms (means over the same images).
    parts = result["prior_bpd"] + result["decoder_bpd"] + result["terms_bpd_sum"]
    np.testing.assert_allclose(result["bits_per_dim"], parts, rtol=1e-5)
    assert 0 < result["bits_per_dim"] < 100 and result["stderr"] > 0
    assert "bits/dim" in proc.stdout


def test_evaluate_refuses_a_missing_checkpoint(tmp_path):
    proc = run_python(["-m", "ddpm_jax.evaluate", f"--workdir={tmp_path / 'nothing'}"])
    assert proc.returncode == 2 and "error: no checkpoint at" in proc.stderr
