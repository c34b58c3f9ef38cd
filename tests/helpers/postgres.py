"""A throwaway PostgreSQL server on a loopback port, for tests of the search on a database server.

The server programs come from the ``pgserver`` package (PostgreSQL built into a wheel, in the
``dev`` extra: no root, no system package) or, without it, from a PostgreSQL on this machine
(``initdb`` on ``PATH`` or under ``/usr/lib/postgresql``). PostgreSQL refuses to run as root: as
root, the server runs as the user ``nobody`` in a folder of its own under the temporary folder.
The driver is psycopg (3).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def server_programs() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``, or ``None`` when there is none."""
    spec = importlib.util.find_spec("pgserver")
    candidates = (
        [Path(p) / "pginstall" / "bin" for p in (spec.submodule_search_locations or [])] if spec else []
    )
    on_path = shutil.which("initdb")
    candidates += [Path(on_path).parent] if on_path else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "postgres").is_file()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server on 127.0.0.1 with a fresh database cluster; yield its SQLAlchemy URL.

    Raises:
        RuntimeError: why no server could be started (the caller skips the test with it).
    """
    programs = server_programs()
    if programs is None:
        raise RuntimeError("no PostgreSQL server programs: pip install -e '.[dev]' (pgserver)")
    user = "nobody" if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="bn-postgres-"))  # under /tmp: reachable by `nobody`
    folder.chmod(0o755)
    if user:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    data, port = folder / "data", _free_port()
    server = None
    try:
        if user and not all(p.stat().st_mode & 0o001 for p in programs.parents):
            # `nobody` cannot reach pgserver's programs (a virtualenv under /root, say): a copy it
            # can reach, with the libraries they load from beside the package (pgserver.libs)
            site = programs.parents[2]
            for name in ("pgserver", "pgserver.libs"):
                if (site / name).is_dir():
                    shutil.copytree(site / name, folder / "site" / name)
            programs = folder / "site" / programs.relative_to(site)
        init = subprocess.run(
            [str(programs / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "utf8"],
            user=user, cwd=folder, capture_output=True, text=True,
        )  # fmt: skip
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()[-500:]}")
        with (folder / "server.log").open("w") as log:
            server = subprocess.Popen(
                [str(programs / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(folder)],
                user=user, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        _wait_until_ready(url, server, folder / "server.log")
        yield url
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown: clients still connected are cut
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_until_ready(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with engine.connect():
                return
        except sqlalchemy.exc.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the PostgreSQL server did not start: {log.read_text()[-500:]}") from None
            time.sleep(0.2)
        finally:
            engine.dispose()
