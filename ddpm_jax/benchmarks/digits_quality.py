"""Are the digits samples digits? A classifier trained on the real digits judges them.

  python -m ddpm_jax.benchmarks.digits_quality --workdir=runs/digits

An RBF SVM (probabilities calibrated on its training data) is fitted on the 1,497 real training
digits, then classifies samples of the checkpoint. Reported per sampler: how many samples fall in
each class and the classifier's mean confidence, beside its confidence on the 300 real test
digits (the level a perfect generator would reach). Prints one JSON line at the end.
"""

import json

import jax
import numpy as np
from absl import app, flags, logging
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_digits
from sklearn.svm import SVC

import ddpm_jax

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The program's flags (defined when it runs: importing the module for its classifier
    defines none)."""
    flags.DEFINE_string("workdir", "runs/digits", "Workdir of a digits run.")
    flags.DEFINE_integer("num_samples", 256, "Samples per sampler.", lower_bound=1)
    flags.DEFINE_list("samplers", ["ddim:100", "ancestral"], "sampler[:num_steps] to evaluate.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


def fit_classifier():
    """(classifier, mean confidence on the real test digits, accuracy there)."""
    x, y = load_digits(return_X_y=True)
    x = np.round(x * 255.0 / 16.0) / 255.0  # the stored uint8 values, scaled to [0, 1]
    clf = CalibratedClassifierCV(SVC(random_state=0), ensemble=False).fit(x[:1497], y[:1497])
    proba = clf.predict_proba(x[1497:])
    return clf, float(proba.max(1).mean()), float((proba.argmax(1) == y[1497:]).mean())


def judge(clf, images: np.ndarray) -> dict:
    proba = clf.predict_proba(images.reshape(len(images), -1) / 255.0)
    return dict(counts=np.bincount(proba.argmax(1), minlength=10).tolist(),
                mean_confidence=float(proba.max(1).mean()),
                confident_fraction=float((proba.max(1) > 0.8).mean()))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    clf, real_conf, real_acc = fit_classifier()
    print(f"real test digits: accuracy {real_acc:.3f}, mean confidence {real_conf:.3f}")
    model = ddpm_jax.load(FLAGS.workdir)
    results = dict(real_test_confidence=real_conf, real_test_accuracy=real_acc)
    for spec in FLAGS.samplers:
        sampler, _, steps = spec.partition(":")
        imgs = model.sample(jax.random.key(FLAGS.seed), FLAGS.num_samples, sampler=sampler,
                            num_steps=int(steps) if steps else None)
        r = judge(clf, imgs)
        results[spec] = r
        print(f"{spec:>12}: per-class counts {r['counts']}, mean confidence "
              f"{r['mean_confidence']:.3f}, confidence > 0.8: {r['confident_fraction']:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    define_flags()
    app.run(main)
