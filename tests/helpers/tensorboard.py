"""Reading what a run logged: every scalar of its event files, and the real TensorBoard server's HTTP API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode


def scalars(run_dir: Path) -> dict[tuple[str, int], float]:
    """Every scalar in a run folder's event files, keyed by (tag, step); later files win."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = {}
    for f in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name)):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out[(v.tag, event.step)] = v.simple_value
                elif v.HasField("tensor") and v.tensor.float_val:
                    out[(v.tag, event.step)] = v.tensor.float_val[0]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    """The real ``tensorboard`` server on ``logdir`` (a context manager), queried over HTTP."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TensorBoard:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(self.logdir), "--port", str(self.port),
             "--host", "127.0.0.1", "--load_fast=false", "--reload_interval=1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )  # fmt: skip
        # The server loads event files in the background: a run shows up before all of its points
        # have been read, so wait until it serves every scalar point the files hold.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if self._serves_every_point():
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.proc.kill()
        raise AssertionError("tensorboard did not start, or did not load every event file within 90 s")

    def _serves_every_point(self) -> bool:
        expected: dict[tuple[str, str], int] = {}
        for run_dir in {events.parent for events in self.logdir.rglob("events.out.tfevents.*")}:
            run = run_dir.relative_to(self.logdir).as_posix()
            for tag, _ in scalars(run_dir):
                expected[(run, tag)] = expected.get((run, tag), 0) + 1
        served = self.get("/data/plugin/scalars/tags")
        for run, tag in expected:
            if tag not in served.get(run, {}):
                return False
        return all(
            len(self.get(f"/data/plugin/scalars/scalars?{urlencode({'run': run, 'tag': tag})}")) >= count
            for (run, tag), count in expected.items()
        )

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def get(self, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
