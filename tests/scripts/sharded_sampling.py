"""One compiled chain of 8 images (each kind of chain: ancestral, DDIM, DPM-Solver++, Heun) on
however many devices there are: the images, how many devices hold them and the FLOPs XLA counts
per device (compared across device counts by the tests)."""

import json

import jax
import numpy as np

import ddpm_jax
from configs import test as test_config
from ddpm_jax import sampling


def result() -> dict:
    model = ddpm_jax.create(test_config.get_config(), seed=0)
    out = {}
    for sampler, steps in (("ancestral", 10), ("ddim", 10), ("dpm_solver++", 10), ("heun", 5)):
        spec = sampling.SamplerSpec(sampler, steps)
        fn = sampling.get_sampling_fn(model.graphdef, spec, (8, 8, 8, 1), model.mesh)
        key = jax.random.key(3)
        args = (model.params, model.diffusion, key, None, 0.0)
        compiled = fn.lower(*args).compile()  # counted and run: one compile
        images = compiled(*args)
        out[sampler] = dict(images=np.asarray(images).tolist(),
                            devices=len(images.sharding.device_set),
                            flops=compiled.cost_analysis()["flops"])
    return out


if __name__ == "__main__":
    print(json.dumps(result()))
