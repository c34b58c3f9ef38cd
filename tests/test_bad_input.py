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
        model(torch.randn(8, 28, 28))
    tokens = torch.randint(0, 100, (8, 40))  # token ids where the model expects a float signal
    with pytest.raises(InputMismatchError, match="dtype torch.int64"):
        model(tokens)


def test_fashion_mlp_on_ag_news_tokens_names_model_data_and_input(tmp_path: Path):
    from tests.ag_news_data import tiny_ag_news

    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "ag_news_cnn_bn.yaml"),
        "--model=MLPBNDropout",  # the Fashion-MNIST MLP
        *tiny_ag_news(tmp_path),
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
    ]
    with pytest.raises(
        InputMismatchError, match=r"MLPBNDropout failed on a batch from AGNews .*dtype torch\.int64"
    ):
        main(args)
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


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


# ---------------------------------------------------------------------------------- data sources
# Missing data_dir/split, wrong columns and wrong image size are tested in test_hub.py,
# test_fashion_mnist.py and test_ag_news.py; these are the cases left.
def _int_labels_parquet(path: Path, n: int, top: int, image: bool) -> None:
    import datasets
    import numpy as np

    labels = [i % (top + 1) for i in range(n)]
    if image:
        images = list(np.zeros((n, 28, 28), dtype=np.uint8))
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(path)
        )
    else:
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
        texts = [f"word{i} news" for i in range(n)]
        datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features).to_parquet(str(path))


@pytest.mark.parametrize("dataset", ["fashion_mnist", "ag_news"])
def test_label_ids_out_of_range_name_split_range_and_schema(tmp_path: Path, dataset: str):
    from src.data.ag_news import AGNews
    from src.data.fashion_mnist import FashionMNIST
    from src.data.hub import DataSourceError

    cls, top, expected = {"fashion_mnist": (FashionMNIST, 12, 9), "ag_news": (AGNews, 6, 3)}[dataset]
    d = tmp_path / dataset
    d.mkdir()
    for split in ("train", "test"):
        _int_labels_parquet(d / f"{split}.parquet", 24, top=top, image=cls is FashionMNIST)
    dm = cls(
        data_dir=str(d), cache_dir=str(tmp_path / "cache"), hf_cache_dir=str(tmp_path / "hf"), val_size=4
    )
    with pytest.raises(
        DataSourceError,
        match=rf"train split run from 0 to {top}; expected class indices 0\.\.{expected}\. Pass",
    ):
        dm.setup("fit")


def test_empty_parquet_split(tmp_path: Path):
    from src.data.fashion_mnist import FashionMNIST
    from src.data.hub import DataSourceError
    from tests.test_fashion_mnist import write_fashion

    d = tmp_path / "fashion"
    d.mkdir()
    write_fashion(d / "train.parquet", 0)
    write_fashion(d / "test.parquet", 5)
    dm = FashionMNIST(
        data_dir=str(d), cache_dir=str(tmp_path / "cache"), hf_cache_dir=str(tmp_path / "hf"), val_size=4
    )
    with pytest.raises(DataSourceError, match=r"train\.parquet \(the train split\) has no rows"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------- predict inputs
@pytest.fixture
def ag_news(tmp_path: Path):
    """A tiny AG News DataModule (vocabulary fitted) and an untrained BN-CNN sized for it."""
    from src.data.ag_news import AGNews
    from src.models.bn_cnn import BNCNN
    from tests.ag_news_data import write_tiny_ag_news

    files = write_tiny_ag_news(tmp_path / "data")

    def make(**kwargs) -> AGNews:
        return AGNews(
            data_files=files, cache_dir=str(tmp_path / "cache"), batch_size=8, val_size=16, **kwargs
        )

    vocab = make().get_vocab()
    model = BNCNN(input_size=len(vocab), num_classes=4).eval()
    return make, model


def test_predict_empty_file_is_refused(tmp_path: Path, ag_news):
    make, _ = ag_news
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="No texts to predict"):
        make(predict_file=str(empty)).setup("predict")


def test_predict_odd_texts_give_finite_probabilities(tmp_path: Path, ag_news):
    make, model = ag_news
    garbage = bytes(range(1, 32)).decode("ascii") + "\ufffd\u200b\U0001f600 \x7f"  # control chars, emoji
    texts = ["", "   \t  ", "stocks " * 300_000, garbage, "<b></b> &amp; #36;", "Stocks rise"]
    dm = make(predict_texts=texts)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    ids = torch.cat([b[0] for b in batches])
    assert ids.shape[0] == len(texts) and ids.shape[1] <= dm.max_length  # the huge text is truncated
    with torch.no_grad():
        probs = torch.cat([model.predict_step(b, i) for i, b in enumerate(batches)])
    assert probs.shape == (len(texts), 4) and torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(-1), torch.ones(len(texts)))


def test_predict_file_of_binary_garbage_is_refused(tmp_path: Path, ag_news):
    make, _ = ag_news
    blob = tmp_path / "model.bin"
    blob.write_bytes(bytes(range(256)) * 4)  # not UTF-8
    with pytest.raises(ValueError, match="not UTF-8"):
        make(predict_file=str(blob)).setup("predict")


def test_checkpoint_from_another_tokenizer_version_warns(ag_news):
    make, _ = ag_news
    state = make().state_dict()
    state["tokenizer_version"] = 0
    with pytest.warns(UserWarning, match="tokenizer version 0 differs"):
        make().load_state_dict(state)


def test_ckpt_path_last_without_any_run_is_refused_for_test(capsys, tmp_path: Path, run_dir: Path):
    shutil.copytree(run_dir / "cache", tmp_path / "cache")
    said = fails(capsys, ["test", *quick(tmp_path), "--ckpt_path=last"])
    assert "--ckpt_path last: no run under" in said


def test_ckpt_path_last_tests_the_newest_run_into_a_folder_of_its_own(unharmed: Path):
    cli = main(["test", *quick(unharmed), "--ckpt_path=last"])
    assert cli.trainer.ckpt_path == str(last_ckpt(unharmed))
    assert cli.trainer.logger.version != 0  # the training run's folder (config.yaml) is left alone
