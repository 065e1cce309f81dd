"""Evaluation during training: metric rows at their steps, equal after a resume, the best
checkpoint kept beside the latest, a missing weight file refused before anything compiles."""

import importlib.util
import json
import os

import pytest

from ddpm_jax import config_lib, training

EVAL_KEYS = {"digits_fd", "digits_fd_ratio", "digits_fd_ratio_real_n", "digits_confidence",
             "precision", "recall", "eval_seconds"}


def _eval_config(test_cfg, steps=4):
    c = test_cfg
    c.training.num_train_steps = steps
    c.training.checkpoint_every = 2
    c.training.max_to_keep = 1
    c.eval.metrics = "digits_fd,precision,recall"
    c.eval.every_steps = 2
    c.eval.num_samples = 16
    c.eval.best_metric = "digits_fd"
    return c


HAVE_WANDB = importlib.util.find_spec("wandb") is not None


def _rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def uninterrupted(digits_dir, tmp_path_factory):
    """A 4-step run evaluated at steps 2 and 4, its rows also sent to wandb (offline)."""
    from configs import test as test_config

    config = test_config.get_config()
    config.data.data_dir = digits_dir
    config = _eval_config(config)
    config.eval.wandb = HAVE_WANDB  # the optional extra: its rows are checked when installed
    workdir = str(tmp_path_factory.mktemp("eval_run"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        training.train_and_evaluate(config, workdir)
    return workdir


def test_metric_rows_at_their_steps_tensorboard_and_best_checkpoint(uninterrupted, digits_dir):
    from test_training import _tensorboard_events

    import ddpm_jax
    from ddpm_jax.metrics import digits as dm

    workdir = uninterrupted
    rows = _rows(workdir)
    evals = [r for r in rows if "digits_fd" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    for r in evals:
        assert set(r) == {"step"} | EVAL_KEYS and r["digits_fd"] > 0
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert r["digits_fd_ratio"] > 1  # four steps of training make no digits
        # beside it, what as many (16) real training digits score
        assert r["digits_fd_ratio_real_n"] == pytest.approx(
            dm.real_n_ratio(dm.load_reference(digits_dir), 16), rel=1e-9)
    events = _tensorboard_events(os.path.join(workdir, "tensorboard"))
    assert {("digits_fd", 2), ("digits_fd", 4)} <= {(t, s) for t, s, _ in events}
    # The best step by digits_fd is kept in best/, beside the latest, whatever max_to_keep says.
    best = min(evals, key=lambda r: r["digits_fd"])
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]  # max_to_keep = 1
    assert os.listdir(os.path.join(workdir, "best")) == [str(best["step"])]
    model = ddpm_jax.load(os.path.join(workdir, "best"))
    assert model.step == best["step"]
    for name in ("loss.png", "quality.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 1000



@pytest.mark.skipif(not HAVE_WANDB, reason="the wandb extra is not installed")
def test_the_same_rows_go_to_wandb_offline(uninterrupted):
    # The same rows went to Weights & Biases (offline): its run file holds every row's values
    # (history items are stored as JSON text).
    workdir = uninterrupted
    rows = _rows(workdir)
    (run_dir,) = [d for d in os.listdir(os.path.join(workdir, "wandb")) if d.startswith(
        "offline-run-")]
    (record,) = [f for f in os.listdir(os.path.join(workdir, "wandb", run_dir))
                 if f.endswith(".wandb")]
    data = open(os.path.join(workdir, "wandb", run_dir, record), "rb").read()
    for r in rows:
        for key, value in r.items():
            assert key.encode() in data and json.dumps(value).encode() in data, (key, value)


def test_a_resumed_run_logs_what_an_uninterrupted_run_logs(uninterrupted, test_cfg, tmp_path):
    workdir = str(tmp_path / "resumed")
    training.train_and_evaluate(_eval_config(test_cfg, steps=2), workdir)  # stops at step 2
    with test_cfg.unlocked():
        test_cfg.training.num_train_steps = 4
    training.train_and_evaluate(test_cfg, workdir)  # resumes at 2
    want = [r for r in _rows(uninterrupted) if "digits_fd" in r]
    got = [r for r in _rows(workdir) if "digits_fd" in r]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "eval_seconds"} for r in rows]
    assert strip(got) == strip(want)
    assert os.listdir(os.path.join(workdir, "best")) == os.listdir(
        os.path.join(uninterrupted, "best"))


@pytest.mark.parametrize("metrics, message", [
    ("fid", "config.eval.metrics asks for fid / is: "),
    ("digits_fd,sharpness", "config.eval.metrics: unknown sharpness"),
    ("precision", "config.eval.metrics: precision / recall are measured with digits_fd"),
])
def test_refused_at_start_up_in_one_line(test_cfg, tmp_path, monkeypatch, metrics, message):
    monkeypatch.delenv("DDPM_JAX_INCEPTION_WEIGHTS", raising=False)
    test_cfg.eval.metrics = metrics

    def compiled(*args, **kwargs):
        raise AssertionError("the train state was built before the refusal")

    monkeypatch.setattr(training, "create_train_state", compiled)
    with pytest.raises(config_lib.ConfigError) as e:
        training.train_and_evaluate(test_cfg, str(tmp_path / "refused"))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "refused" / "checkpoints")


def test_best_metric_must_be_measured(test_cfg):
    from ddpm_jax import evaluation

    test_cfg.eval.metrics = "digits_fd"
    test_cfg.eval.best_metric = "fid"
    with pytest.raises(config_lib.ConfigError, match="best_metric='fid' is not measured"):
        evaluation.plan(test_cfg)
    assert evaluation.is_better("precision", 0.5, 0.4) and evaluation.is_better("fid", 3.0, 4.0)
    assert not evaluation.is_better("digits_fd", 4.0, 4.0)
