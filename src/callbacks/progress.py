"""A progress bar that costs next to nothing per training step."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme


class ThrottledRichProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar``, redrawn a few times per second instead of 100.

    Lightning passes ``refresh_rate`` (default 100) to Rich as redraws per second: a background
    thread then renders the bar 100 times a second and competes with training for the
    interpreter; on a 2-core machine that made MNIST-1D epochs about 1.5x slower (benchmarks/
    speed.py). Here the bar is redrawn ``refresh_rate`` times per second, and the metrics column is
    rebuilt at most that often during training (the project logs once per epoch, so it rarely
    changes; reading it converts every value to a Python float, a host sync on GPUs).

    Args:
        refresh_rate: redraws per second (0 disables the bar).
        leave: keep finished epoch bars on screen.
        theme: Lightning's ``RichProgressBarTheme``.
        console_kwargs: arguments for Rich's ``Console``.
    """

    def __init__(
        self,
        refresh_rate: int = 4,
        leave: bool = False,
        theme: RichProgressBarTheme = RichProgressBarTheme(),
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=theme, console_kwargs=console_kwargs)
        self._metrics_due = 0.0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:  # a run resumed mid-epoch
            self._initialize_train_progress_bar_id()
        if self.progress is not None:
            # Rich's own thread redraws; here only the count changes (no forced refresh).
            self.progress.update(self.train_progress_bar_id, completed=batch_idx + 1)
        now = time.monotonic()
        if now >= self._metrics_due:
            self._metrics_due = now + 1.0 / self.refresh_rate
            self._update_metrics(trainer, pl_module)
