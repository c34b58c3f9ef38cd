"""DataModules that exist only for tests, importable by the CLI subprocesses
(``--data=tests.helpers.datamodules.X``)."""

from __future__ import annotations

from src.data import MNIST1D, ClassificationDataModule


class MNIST1DOwnCache(MNIST1D):
    """MNIST-1D that declares none of its own options resumable: its ``cache_dir`` is part of the
    experiment, so a resume that moves it is refused (the project's machinery names no data key)."""

    resumable_options = ClassificationDataModule.resumable_options
