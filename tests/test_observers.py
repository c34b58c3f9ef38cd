"""Observing never changes training: the callbacks that read activations, predictions or metrics
leave the trained weights exactly as a run without them, whatever the evaluation batch size (one
sample included), through the CLI as a user runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.cli import config, data_class, run_cli
from tests.helpers.data import TINY_DATA
from tests.helpers.tensorboard import scalars

pytestmark = pytest.mark.slow

# Callbacks that only look: what they do may be logged or written, never trained on.
OBSERVERS = {
    "ActivationStats": {"every_n_steps": 1, "histogram_every_n_steps": 2},
    "LearningRateMonitor": {"logging_interval": "step", "log_momentum": True},
    "PerClassReport": {},
    "TokenHeatmap": {"num_examples": 2},
    "PredictionWriter": {},
}


def callbacks_overlay(config_path: str, folder: Path, observed: bool) -> str:
    """A ``--config`` overlay with the config's callbacks: the observers (each logging as often as
    it can) or none of them."""
    listed = yaml.safe_load(Path(config_path).read_text())["trainer"]["callbacks"]
    kept = [c for c in listed if c["class_path"].rsplit(".", 1)[-1] not in OBSERVERS]
    if observed:
        kept += [{"class_path": name, "init_args": args} for name, args in OBSERVERS.items()]
    path = folder / f"callbacks_{'observed' if observed else 'plain'}.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": kept}}))
    return str(path)


def trained_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]


# The observed run's eval batch size against the plain run's 10: one sample per batch for AG News (whose
# 10 validation texts are one batch of 10), the whole split in one batch for MNIST-1D (60 signals, six
# batches of 10).
OBSERVED_EVAL_BATCH_SIZE = {"mnist1d_resnet_bn": 500, "ag_news_cnn_bn": 1}


@pytest.mark.parametrize("name", ["mnist1d_resnet_bn", "ag_news_cnn_bn"])
def test_observing_callbacks_and_the_eval_batch_size_leave_the_weights_alone(name: str, tmp_path: Path):
    path = config(name)
    data = TINY_DATA[data_class(path)](tmp_path)
    # The observed run differs from the plain one in both the observers and the eval batch size: equal
    # weights pin both (a change by one would have to be undone exactly by the other).
    observed_size = OBSERVED_EVAL_BATCH_SIZE[name]
    runs = {
        "plain, eval batches of 10": (False, 10),
        f"observed, eval batches of {observed_size}": (True, observed_size),
    }
    weights = {}
    for i, (label, (observed, eval_batch_size)) in enumerate(runs.items()):
        out = run_cli(
            "fit", "--config", path, "--config", callbacks_overlay(path, tmp_path, observed), *data,
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false", "--test_after_fit=true",
            f"--data.init_args.eval_batch_size={eval_batch_size}",
            cwd=tmp_path,
        )  # fmt: skip
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
        run = tmp_path / "logs" / name / f"version_{i}"
        if observed:  # the observers did run
            assert (run / "per_class_report.json").is_file()
            assert any(tag.startswith("activations_init/var/") for tag, _ in scalars(run))
        weights[label] = trained_weights(run)
    reference = weights.pop("plain, eval batches of 10")
    for label, state in weights.items():
        assert state.keys() == reference.keys()
        changed = [k for k in reference if not torch.equal(reference[k], state[k])]
        assert not changed, f"{label}: {changed[:5]} differ from the run without observers"
