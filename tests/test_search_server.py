"""The search on a database server, as docs/search.md's many-machines recipe runs it: a local
PostgreSQL on a loopback port, two ``python -m src.tools.search`` workers with the same study URL
(each with its own output folder, as on two machines), and optuna-dashboard on the same storage."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="the search extra (optuna) is not installed")
pytest.importorskip("psycopg", reason="the search extra (psycopg, PostgreSQL's driver) is not installed")

from optuna.trial import TrialState  # noqa: E402

from tests.helpers.cli import ROOT, env  # noqa: E402
from tests.helpers.postgres import postgres_server  # noqa: E402

pytestmark = pytest.mark.slow
DROPOUT = "model.init_args.dropout=float(0.0,0.5)"


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    try:
        with postgres_server() as url:
            yield url
    except RuntimeError as err:
        pytest.skip(f"no PostgreSQL server could be started: {err}")


def worker(url: str, output: Path, cache: Path) -> subprocess.Popen:
    """One worker of the study ``shared`` with a budget of 4 trials (1 epoch each, no pruning)."""
    args = ["--config", str(ROOT / "configs" / "mnist1d_resnet_bn.yaml"), "--space", DROPOUT, "--trials", "4",
            "--study", "shared", "--storage", url, "--output", str(output), "--pruner", "none",
            "--", "--data.init_args.num_samples=400", "--data.init_args.val_size=40", "--data.init_args.batch_size=32",
            f"--data.init_args.cache_dir={cache}", "--trainer.max_epochs=1", "--trainer.accelerator=cpu"]  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "src.tools.search", *args], cwd=output.parent, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_two_workers_share_one_study_on_postgresql_and_the_dashboard_shows_it(database: str, tmp_path: Path):
    workers = [worker(database, tmp_path / name, tmp_path / "cache") for name in ("machine_a", "machine_b")]
    for w in workers:
        _stdout, stderr = w.communicate(timeout=900)
        assert w.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    trials = optuna.load_study(study_name="shared", storage=database).get_trials()
    counted = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(counted) == 4, [(t.number, t.state.name, t.user_attrs.get("note")) for t in trials]
    # Nothing lost: no trial left running or waiting; every other trial is one a worker asked for
    # after the budget was taken, and ran nothing.
    for t in trials:
        assert t.state == TrialState.COMPLETE or t.user_attrs["note"].startswith("not run"), t
    for t in counted:  # each a finished run, on the machine that ran it
        run = Path(t.user_attrs["run_dir"])
        assert (run / "config.yaml").is_file() and list((run / "checkpoints").glob("*.ckpt"))
        assert list(t.intermediate_values) == [0] and t.value == t.intermediate_values[0]
    assert len({t.user_attrs["worker"]["pid"] for t in counted}) == 2  # both workers ran trials
    for machine in ("machine_a", "machine_b"):
        assert "4 trials counted" in (tmp_path / machine / "trials.md").read_text()

    dashboard, base = _dashboard(database)
    try:
        studies = _get(f"{base}/api/studies")["study_summaries"]
        (study,) = [s for s in studies if s["study_name"] == "shared"]
        detail = _get(f"{base}/api/studies/{study['study_id']}")
        assert sorted(t["state"] for t in detail["trials"]).count("Complete") == 4
        assert len(detail["trials"]) == len(trials)
    finally:
        dashboard.terminate()
        dashboard.wait(30)


def _dashboard(url: str) -> tuple[subprocess.Popen, str]:
    """``optuna-dashboard URL`` on a free loopback port, as docs/search.md starts it; and its address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    program = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen([str(program), url, "--host", "127.0.0.1", "--port", str(port)],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        try:
            _get(f"{base}/api/meta")
            return proc, base
        except OSError:
            assert proc.poll() is None, f"optuna-dashboard ended: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "optuna-dashboard did not answer within 60 s"
            time.sleep(0.3)


def _get(address: str) -> dict:
    with urllib.request.urlopen(address, timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())
