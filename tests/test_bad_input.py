"""Every mistake a user can make gets a clear message, and nothing already on disk is harmed.

The CLI runs in-process here (``src.cli.main``) to keep the suite fast; ``tests/test_cli.py`` and
``tests/test_reliability.py`` run it as a subprocess, as a user does.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from src.cli import main
from src.data import MNIST1D, ClassificationDataModule, TensorBatches
from src.models import ResidualBN
from src.models.classifier import InputMismatchError
from tests.conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")
CONFIG = str(ROOT / "configs" / "mnist1d_resnet_bn.yaml")


def quick(root: Path) -> list[str]:
    """One short epoch on tiny MNIST-1D (420 train / 60 val / 120 test), logs under ``root``."""
    return [
        "--config",
        CONFIG,
        f"--data.init_args.cache_dir={root / 'cache'}",
        "--data.init_args.num_samples=600",
        "--data.init_args.val_size=60",
        "--data.init_args.batch_size=32",
        f"--trainer.logger.init_args.save_dir={root / 'logs'}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=false",
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run (logs, config, checkpoints) that bad commands must leave untouched."""
    root = tmp_path_factory.mktemp("existing")
    main(["fit", *quick(root)])
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def fails(capsys, args: list[str]) -> str:
    """Run the CLI expecting it to stop; return everything it said (exit message and stderr)."""
    with pytest.raises((SystemExit, Exception)) as info:
        main(args)
    captured = capsys.readouterr()
    said = f"{info.value}\n{captured.err}"
    if isinstance(info.value, SystemExit):
        assert info.value.code not in (0, None), said
    return said


@pytest.fixture
def unharmed(run_dir: Path):
    """Assert that every file of the existing run is byte-for-byte the same after the test."""
    before = snapshot(run_dir)
    yield run_dir
    after = snapshot(run_dir)
    assert {k: after.get(k) for k in before} == before


def last_ckpt(run_dir: Path) -> Path:
    return next((run_dir / "logs").rglob("last.ckpt"))


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data.init_args.batchsize=3"], "batchsize"),  # unknown key (model keys: test_cli.py)
        (["--data.init_args.batch_size=many"], "batch_size"),  # wrong type
        (["--model=NoSuchNet"], "NoSuchNet"),  # unknown model class
        (["--data=src.data.NoSuchData"], "NoSuchData"),  # unknown data class
        (["--data.init_args.loader=gpu"], "loader"),  # value outside a Literal
    ],
    ids=["unknown-key", "wrong-type", "unknown-model", "unknown-data", "bad-choice"],
)
def test_config_errors_name_the_offending_option(capsys, unharmed: Path, args: list[str], expected: str):
    said = fails(capsys, ["fit", *quick(unharmed), *args])
    assert expected in said and "error:" in said


def test_missing_required_model_is_named(capsys):
    said = fails(capsys, ["fit", "--data=MNIST1D"])
    assert "required" in said and "model" in said


def test_model_that_cannot_consume_the_data_names_both():
    model = ResidualBN(input_size=40, num_classes=10)
    with pytest.raises(InputMismatchError, match=r"ResidualBN failed on a batch .*shape \(8, 28, 28\)"):
        model.forward_batch(torch.randn(8, 28, 28))
    tokens = torch.randint(0, 100, (8, 40))  # token ids where the model expects a float signal
    with pytest.raises(InputMismatchError, match="dtype torch.int64"):
        model.forward_batch(tokens)


# ---------------------------------------------------------------------------------- data
class _Empty(ClassificationDataModule):
    num_classes = 10
    input_size = 40

    def load_splits(self):
        return {
            "train": (torch.zeros(0, 40), torch.zeros(0, dtype=torch.long)),
            "test": (torch.zeros(5, 40),) * 2,
        }


def test_empty_dataset_is_refused_with_the_split_name():
    with pytest.raises(ValueError, match="'train' split has no samples"):
        _Empty().setup("fit")


def test_validation_split_larger_than_training_set(capsys, unharmed: Path):
    said = fails(capsys, ["fit", *quick(unharmed), "--data.init_args.val_size=100000"])
    assert "val_size=100000" in said and "training-set size" in said


def test_batch_larger_than_training_set_trains_on_one_batch_per_epoch(tmp_path: Path, run_dir: Path):
    shutil.copytree(run_dir / "cache", tmp_path / "cache")
    main(["fit", *quick(tmp_path), "--data.init_args.batch_size=1000", "--trainer.limit_train_batches=1.0"])
    assert torch.load(last_ckpt(tmp_path), weights_only=True)["global_step"] == 1


@pytest.mark.parametrize("loader", ["tensors", "dataloader"])
def test_final_training_batch_of_one_sample_is_dropped_not_crashing_batchnorm(
    tmp_path: Path, run_dir: Path, loader
):
    shutil.copytree(run_dir / "cache", tmp_path / "cache")
    # 420 training samples in batches of 419: the last batch would hold one sample
    main(
        [
            "fit",
            *quick(tmp_path),
            "--data.init_args.batch_size=419",
            f"--data.init_args.loader={loader}",
            "--trainer.limit_train_batches=1.0",
        ]
    )
    assert torch.load(last_ckpt(tmp_path), weights_only=True)["global_step"] == 1


def test_tensor_batches_drop_only_a_single_sample_final_batch():
    x = torch.arange(9.0)
    sizes = lambda tb: [len(b[0]) for b in tb]  # noqa: E731
    assert sizes(TensorBatches((x,), batch_size=4, drop_last_single=True)) == [4, 4]  # 9 = 4 + 4 + 1
    assert len(TensorBatches((x,), batch_size=4, drop_last_single=True)) == 2
    assert sizes(TensorBatches((x,), batch_size=3, drop_last_single=True)) == [3, 3, 3]
    assert sizes(TensorBatches((x[:6],), batch_size=4, drop_last_single=True)) == [4, 2]
    assert sizes(TensorBatches((x,), batch_size=4)) == [4, 4, 1]  # evaluation keeps every sample


def test_tensor_batches_resume_mid_epoch_skips_served_batches():
    x = torch.arange(20.0)
    first = TensorBatches((x,), batch_size=3, shuffle=True, seed=5)
    first.set_epoch(2)
    it = iter(first)
    seen = [next(it)[0] for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches_served": 3}
    resumed = TensorBatches((x,), batch_size=3, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    rest = [b[0] for b in resumed]
    assert torch.equal(torch.cat(seen + rest).sort().values, x)  # the epoch completes, nothing twice
    resumed.set_epoch(3)
    assert len(list(resumed)) == 7  # the next epoch is whole again
    at_end = TensorBatches((x,), batch_size=3, shuffle=True, seed=5)
    at_end.load_state_dict({"epoch": 2, "batches_served": 7})  # saved at the end of epoch 2
    at_end.set_epoch(3)
    assert len(list(at_end)) == 7


# ---------------------------------------------------------------------------------- checkpoints
def test_fit_from_missing_checkpoint(capsys, unharmed: Path):
    said = fails(capsys, ["fit", *quick(unharmed), "--ckpt_path", str(unharmed / "nope.ckpt")])
    assert "is not a file" in said


@pytest.mark.parametrize("sub", ["fit", "test"])
def test_truncated_checkpoint(capsys, unharmed: Path, tmp_path: Path, sub: str):
    data = last_ckpt(unharmed).read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    said = fails(capsys, [sub, *quick(unharmed), "--ckpt_path", str(cut)])
    assert "corrupt, truncated" in said and "cut.ckpt" in said
    assert cut.read_bytes() == data[: len(data) // 2]


class OtherSignals(MNIST1D):
    """Stands for another dataset whose checkpoints must not be tested on MNIST-1D."""


def test_checkpoint_of_another_data_class(capsys, unharmed: Path, tmp_path: Path):
    ckpt = torch.load(last_ckpt(unharmed), weights_only=True)
    ckpt["datamodule_hyper_parameters"]["_class_path"] = f"{__name__}.OtherSignals"
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    said = fails(capsys, ["test", *quick(unharmed), "--ckpt_path", str(other)])
    assert f"holds a {__name__}.OtherSignals data" in said and "src.data.MNIST1D" in said


def test_checkpoint_of_a_differently_shaped_model(capsys, unharmed: Path):
    # signals of length 60: the linked input size no longer matches the checkpoint's weights
    said = fails(
        capsys,
        ["test", *quick(unharmed), "--data.init_args.length=60", "--ckpt_path", str(last_ckpt(unharmed))],
    )
    assert "does not fit the model" in said and "size mismatch" in said


# ---------------------------------------------------------------------------------- CLI
def test_more_devices_than_the_machine_has(capsys, unharmed: Path):
    said = fails(capsys, ["fit", *quick(unharmed), "--trainer.accelerator=cpu", "--trainer.devices=100000"])
    assert "--trainer.devices=100000 asks for 100000 CPU device(s)" in said


def test_unwritable_log_directory(capsys, unharmed: Path):
    blocker = unharmed / "logs" / "mnist1d_resnet_bn" / "version_0" / "config.yaml"  # a file, not a folder
    said = fails(capsys, ["fit", *quick(unharmed), f"--trainer.logger.init_args.save_dir={blocker}"])
    assert "cannot write the log folder" in said and "save_dir" in said
