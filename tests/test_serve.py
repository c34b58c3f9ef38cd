"""`python -m src.tools.serve`: the real LitServe server in a subprocess, called over HTTP.

Predictions equal ``python -m src.cli predict`` on the same inputs for each kind of input; concurrent
requests; bad requests answered with a 4xx JSON saying what was wrong, on the same keep-alive
connection, while the server keeps serving; a small request answered while a large one is still
being read; SIGTERM/SIGINT shutdown; bad checkpoint and busy port. Needs the serve extra (litserve,
httpx); skipped without it. A server takes ~10 s to start on a 2-core machine; each is started
once for the module.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("litserve", reason="the serve extra (litserve) is not installed")
httpx = pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")

from src.tools.inference import load_for_inference  # noqa: E402
from tests.helpers.cli import ROOT  # noqa: E402
from tests.helpers.serving import (  # noqa: E402
    CONFIG_NAMES,
    FAULT,
    HOLD,
    cli_predictions,
    held_checkpoint,
    read_predictions,
    run_module,
    tiny_checkpoint,
    tiny_predictions,
)

pytestmark = pytest.mark.slow  # each test trains or serves a model in a subprocess

# Predictions are compared with `predict` once per DataModule (MNIST-1D signals, images, texts): the
# server runs every network the same way. The other MNIST-1D network serves as the held server's.
PREDICTED = ("mnist1d_resnet_bn", "fashion_mnist_mlp_bn", "ag_news_cnn_bn")
HELD = "mnist1d_resconv_bn"
assert {*PREDICTED, HELD} == set(CONFIG_NAMES)
MAX_BYTES = 300_000
MAX_INPUTS = 64
PROB_ATOL = 2e-6  # predictions.csv rounds probabilities to 6 decimals


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> set[int]:
    """Every live descendant process of ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


class Server:
    """``python -m src.tools.serve`` in a subprocess (output in a log file), ready when /health says ok.

    It starts with SIGINT ignored, as a script's background job (``cmd &``) does, and the fixture
    stops it with SIGINT: the server must stop on it all the same (Python leaves an ignored SIGINT
    ignored)."""

    def __init__(self, ckpt: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BN_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [
            "sh",
            "-c",
            'trap "" INT && exec "$@"',
            "sh",
            sys.executable,
            "-m",
            "src.tools.serve",
            "--ckpt_path",
            str(ckpt),
            "--port",
            str(self.port),
            *args,
        ]
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server never got healthy:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def predict(self, inputs: list) -> list[dict]:
        response = self.client.post("/predict", json={"inputs": inputs})
        assert response.status_code == 200, response.text
        return response.json()["predictions"]

    def stop(self, sig: int = signal.SIGTERM, within: float = 15.0) -> tuple[int, float, set[int]]:
        """Send ``sig``; return the exit status, the seconds until every process had gone, and any left."""
        self.client.close()
        children = children_of(self.proc.pid)
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            for pid in children_of(self.proc.pid) | children | {self.proc.pid}:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(
                f"the server ignored signal {sig} for {within} s:\n{self.log.read_text()[-3000:]}"
            ) from None
        left = children
        while left and time.monotonic() - start < within:  # e.g. multiprocessing's resource tracker
            time.sleep(0.1)
            left = {pid for pid in left if _alive(pid)}
        return code, time.monotonic() - start, left


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def servers(runs_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """Start one server per config on first use; stop the ones still running at the end (SIGINT)."""
    started: dict[str, Server] = {}
    logs = tmp_path_factory.mktemp("server_logs")

    def get(name: str) -> Server:
        """The server of config ``name``'s tiny checkpoint, or of :func:`held_checkpoint` (``"held"``)."""
        if name not in started:
            args = ("--max_request_bytes", str(MAX_BYTES), "--max_inputs", str(MAX_INPUTS))
            if (
                name == "ag_news_cnn_bn"
            ):  # two inference workers (and HTTP processes) for the concurrency test
                args += ("--workers", "2")
            ckpt = held_checkpoint(runs_root, HELD) if name == "held" else tiny_checkpoint(name, runs_root)
            started[name] = Server(ckpt, logs / f"{name}.log", *args)
        return started[name]

    yield get
    problems = []
    for name, server in started.items():  # every server is stopped before anything is reported
        if server.proc.poll() is None:
            # LitServe gives open keep-alive connections up to 30 s to finish (uvicorn's graceful
            # timeout, fixed in LitServe), then 5 s per inference worker, then stops its manager: on
            # a loaded machine that has taken over 45 s for the server that served the fault tests.
            try:
                code, _, left = server.stop(signal.SIGINT, within=90.0)
            except AssertionError as err:  # killed by stop(); the other servers are still stopped
                problems.append((name, str(err)))
                continue
            if code != 0 or left:
                problems.append((name, code, left, server.log.read_text()[-2000:]))
    assert not problems, problems


# ---------------------------------------------------------------------- raw inputs of each kind
def raw_test_split(ckpt: Path) -> tuple[np.ndarray, str]:
    """The raw inputs of the checkpoint's test split (what `predict` runs on) and the input kind."""
    _, datamodule = load_for_inference(ckpt)
    datamodule.setup("test")
    return datamodule.splits["test"][0].numpy(), type(datamodule).__name__


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.astype(np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


AG_TEXTS = [
    "Stocks and profit rise on the oil market",
    "",
    "The coach said the league season ends with a goal",
    "coach " * 300,  # far beyond max_length
    "Ünïcödé 東京 ☃ — “quoted” &lt;b&gt;software&lt;/b&gt; #36;5",
    "qqqx zzzy wwwv",  # all unknown
    "Minister and president meet for embassy talks (Reuters)",
]


def _trained_precision(name: str) -> str | None:
    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["trainer"].get("precision")


def assert_same(served: list[dict], expected: list[dict], atol: float = PROB_ATOL) -> None:
    assert len(served) == len(expected)
    for i, (got, want) in enumerate(zip(served, expected, strict=True)):
        assert got["predicted"] == want["predicted"], (i, got, want)
        assert list(got["probabilities"]) == list(want["probabilities"])  # class order kept
        np.testing.assert_allclose(
            list(got["probabilities"].values()), list(want["probabilities"].values()), rtol=0, atol=atol
        )


# ---------------------------------------------------------------------- predictions
@pytest.mark.parametrize("name", PREDICTED)
def test_predictions_equal_cli_predict_on_the_same_inputs(
    name: str, servers, runs_root: Path, tmp_path: Path
):
    server = servers(name)
    ckpt = tiny_checkpoint(name, runs_root)
    if name.startswith("ag_news"):
        expected = cli_predictions(ckpt, tmp_path, f"--data.init_args.predict_texts={json.dumps(AG_TEXTS)}")
        assert [row["text"] for row in expected] == AG_TEXTS
        served = server.predict(AG_TEXTS[:3]) + server.predict(AG_TEXTS[3:4]) + server.predict(AG_TEXTS[4:])
    elif _trained_precision(name) in (None, "32", "32-true"):
        # `python -m src.cli predict --ckpt_path` on the test split (run once in the session: its
        # output is tests/test_configs.py's too)
        expected = read_predictions(tiny_predictions(name, runs_root)[0])
    else:  # the server runs the network in float32; predict follows the run's precision unless told
        expected = cli_predictions(ckpt, tmp_path, "--trainer.precision=32-true")
    if not name.startswith("ag_news"):
        raw, kind = raw_test_split(ckpt)
        if kind == "FashionMNIST":  # PNGs, nested pixel arrays and flat pixel arrays
            inputs = [png_base64(x) for x in raw[:8]] + [x.tolist() for x in raw[8:16]]
            inputs += [{"png": png_base64(x)} for x in raw[16:18]] + [
                x.reshape(-1).tolist() for x in raw[18:]
            ]
        else:  # MNIST-1D signals
            inputs = [x.tolist() for x in raw]
        served = []
        for start, size in ((0, 1), (1, 5), (6, MAX_INPUTS), (6 + MAX_INPUTS, len(inputs))):
            if start < len(inputs):
                served += server.predict(inputs[start : start + size])
    assert_same(served, expected)


def test_concurrent_requests_get_their_own_answers(servers, runs_root: Path):
    server = servers("ag_news_cnn_bn")
    assert server.client.get("/info").json()["server"]["workers_per_device"] == 2
    texts = [
        f"{w} {i}" for i, w in enumerate(["stocks oil", "coach goal", "chip software", "troops talks"] * 10)
    ]
    alone = {t: server.predict([t])[0] for t in texts}  # one at a time: server batches of one request
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def worker(mine: list[str]) -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for i in range(0, len(mine), 2):
                    r = client.post("/predict", json={"inputs": mine[i : i + 2]})
                    assert r.status_code == 200, r.text
                    results.update(zip(mine[i : i + 2], r.json()["predictions"], strict=True))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(texts[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert set(results) == set(texts)
    # batched with other requests (other texts, other padding) the answers stay the same
    assert_same([results[t] for t in texts], [alone[t] for t in texts], atol=1e-5)


# ---------------------------------------------------------------------- bad requests
def _chunks(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def png_bomb(width: int, height: int) -> str:
    """A valid base64 PNG of ``width``x``height`` black 1-bit pixels: a few dozen KB that PIL's
    decompression-bomb guard refuses to open when it is large."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def connection_of(response: httpx.Response) -> tuple[str, int]:
    """The client end (address, port) of the connection that carried ``response``."""
    return response.extensions["network_stream"].get_extra_info("client_addr")


def test_bad_requests_get_a_4xx_json_answer_and_the_server_keeps_serving(servers, runs_root: Path):
    server = servers("fashion_mnist_mlp_bn")
    good = [[[0] * 28] * 28]
    client = server.client
    json_type = {"Content-Type": "application/json"}
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < MAX_BYTES // 2  # under the size limit: PIL's guard is what refuses it
    # case: (response, status, words of the message)
    cases = {
        "wrong shape": (client.post("/predict", json={"inputs": [[[0] * 28] * 27]}), 422, "shape 27x28"),
        "pixel out of range": (
            client.post("/predict", json={"inputs": [[[300] * 28] * 28]}),
            422,
            "0 to 255",
        ),
        "0-1 float pixels": (client.post("/predict", json={"inputs": [[[0.5] * 28] * 28]}), 422, "integers"),
        "NaN pixels": (
            client.post(
                "/predict", content=b'{"inputs": [[' + b",".join([b"NaN"] * 784) + b"]]}", headers=json_type
            ),
            422,
            "integers",
        ),
        "not an image": (
            client.post("/predict", json={"inputs": [base64.b64encode(b"GIF89a nope").decode()]}),
            422,
            "not a readable 28x28 image",
        ),
        "wrong image size": (
            client.post("/predict", json={"inputs": [png_base64(np.zeros((32, 32)))]}),
            422,
            "the image is 32x32, expected 28x28",
        ),
        "decompression bomb": (client.post("/predict", json={"inputs": [bomb]}), 422, "decompression bomb"),
        "a text": (client.post("/predict", json={"inputs": ["a shirt"]}), 422, "base64"),
        "empty body": (client.post("/predict", content=b"", headers=json_type), 400, "empty"),
        "non-UTF-8 body": (
            client.post("/predict", content=b'{"inputs": ["\xff\xfe"]}', headers=json_type),
            400,
            "not UTF-8",
        ),
        "not JSON": (client.post("/predict", content=b"{inputs: [1, 2", headers=json_type), 400, "not JSON"),
        "nested 2,000 deep": (
            client.post(
                "/predict", content=b'{"inputs": ' + b"[" * 2000 + b"]" * 2000 + b"}", headers=json_type
            ),
            400,
            "nested too deeply",
        ),
        "an integer of 5,000 digits": (
            client.post("/predict", content=b'{"inputs": [' + b"9" * 5000 + b"]}", headers=json_type),
            400,
            "digits",
        ),
        "no inputs key": (client.post("/predict", json={"input": good}), 400, '{"inputs"'),
        "inputs not a list": (client.post("/predict", json={"inputs": good[0][0][0]}), 400, "a list"),
        "no inputs": (client.post("/predict", json={"inputs": []}), 400, "empty"),
        "too many inputs": (
            client.post("/predict", json={"inputs": good * (MAX_INPUTS + 1)}),
            413,
            f"at most {MAX_INPUTS}",
        ),
        "too large": (
            client.post("/predict", content=b" " * (MAX_BYTES + 1), headers=json_type),
            413,
            f"at most {MAX_BYTES} are accepted",
        ),
        "too large, streamed": (
            client.post(
                "/predict", content=_chunks(b'{"inputs": [' + b"0," * MAX_BYTES + b"0]}"), headers=json_type
            ),
            413,
            f"at most {MAX_BYTES} are accepted",
        ),
    }
    for case, (response, status, words) in cases.items():
        assert response.status_code == status, (case, response.status_code, response.text)
        detail = response.json()["detail"]
        assert words in detail["error"], (case, detail)
        after = client.post("/predict", json={"inputs": good})  # still serving ...
        assert after.status_code == 200 and len(after.json()["predictions"]) == 1, case
        assert connection_of(after) == connection_of(response), case  # ... on the same keep-alive connection
    assert cases["wrong shape"][0].json()["detail"]["input_index"] == 0
    assert "Traceback" not in server.log.read_text()

    # A bad request arriving among good ones fails alone (not its whole server batch).
    statuses: list[int] = []

    def post(body: dict) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            statuses.append(c.post("/predict", json=body).status_code)

    bodies = [{"inputs": good}] * 6 + [{"inputs": [[[1] * 5]]}] + [{"inputs": good}] * 6
    threads = [threading.Thread(target=post, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(statuses) == [200] * 12 + [422]


def test_bad_texts_are_refused(servers, runs_root: Path):
    server = servers("ag_news_cnn_bn")
    lone_surrogate = b'{"inputs": ["fine", "\\ud800 broken"]}'  # valid JSON, not valid UTF-8 text
    r = server.client.post("/predict", content=lone_surrogate, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"]["input_index"] == 1, r.text
    assert "not valid UTF-8" in r.json()["detail"]["error"]
    r = server.client.post("/predict", json={"inputs": ["fine", 42]})
    assert r.status_code == 422 and "expected a text" in r.json()["detail"]["error"]
    r = server.client.post(
        "/predict", content=b'{"inputs": [Infinity]}', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and "expected a text" in r.json()["detail"]["error"]
    # the tiny model reads 30 tokens: a text of more than 100 characters per token is refused
    r = server.client.post("/predict", json={"inputs": ["fine", "word " * 700]})
    assert r.status_code == 422 and r.json()["detail"]["input_index"] == 1, r.text
    assert "the text has 3,500 characters; at most 3,000" in r.json()["detail"]["error"]
    # curl -d sends a form content type: the body is read as JSON all the same
    r = server.client.post(
        "/predict",
        content=json.dumps({"inputs": ["oil", "word " * 600]}),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2


def test_a_small_request_is_answered_while_a_large_one_is_read(servers, tmp_path: Path):
    server = servers("held")  # its DataModule reads the input "hold until <file>" once <file> exists
    release = tmp_path / "release"
    waiting = tmp_path / "release.waiting"
    held: dict[str, httpx.Response] = {}

    def post_held() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            held["response"] = client.post("/predict", json={"inputs": [[0.5] * 40, f"{HOLD}{release}"]})

    thread = threading.Thread(target=post_held)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not waiting.exists():  # the server is reading the held request now
            assert time.monotonic() < deadline and thread.is_alive(), held
            time.sleep(0.02)
        answers = [server.client.post("/predict", json={"inputs": [[float(i)] * 40]}) for i in range(3)]
        assert [r.status_code for r in answers] == [200] * 3
        assert thread.is_alive() and not held  # answered while the held request was still being read
    finally:
        release.touch()
        thread.join(timeout=60)
    assert held["response"].status_code == 200 and len(held["response"].json()["predictions"]) == 2


def test_a_fault_in_the_datamodule_gets_a_500_json_answer_and_the_server_keeps_serving(servers):
    server = servers("held")  # its DataModule raises ZeroDivisionError on the input "fault"
    r = server.client.post("/predict", json={"inputs": [[0.0] * 40, FAULT]})
    assert (
        r.status_code == 500 and "ZeroDivisionError: a bug in parse_raw_input" in r.json()["detail"]["error"]
    )
    after = server.client.post("/predict", json={"inputs": [[0.0] * 40]})
    assert after.status_code == 200 and connection_of(after) == connection_of(r)


def test_health_and_info(servers):
    server = servers("held")
    assert server.client.get("/health").text == "ok"
    info = server.client.get("/info").json()["model"]
    assert info["class_names"] == [str(i) for i in range(10)] and info["request"].startswith('{"inputs"')


# ---------------------------------------------------------------------- start and stop
def test_a_batching_server_waits_for_requests_with_the_blocking_loop(tmp_path: Path):
    """With batching on, the API runs :class:`IdleWaitingBatchedLoop` (idle, LitServe 0.2's own
    batched loop asks its queue every millisecond: ``benchmarks.serve`` prints the idle CPU); with
    ``--max_batch_size 1``, LitServe's unbatched loop, which blocks already."""
    from litserve.loops import BatchedLoop

    from src.tools.serve import ClassifierAPI
    from src.tools.serve_loop import IdleWaitingBatchedLoop

    assert isinstance(ClassifierAPI(str(tmp_path / "c.ckpt"), max_batch_size=16).loop, IdleWaitingBatchedLoop)
    assert not isinstance(ClassifierAPI(str(tmp_path / "c.ckpt"), max_batch_size=1).loop, BatchedLoop)


def test_the_batched_loop_blocks_on_an_empty_queue_then_batches_what_arrives(monkeypatch):
    """The loop's wait, with LitServe's own gathering: one blocking ``get`` while idle (LitServe
    0.2's loop asks every millisecond), then the request that ended the wait and those after it in
    one batch, in order."""
    import queue
    from types import SimpleNamespace

    from src.tools import serve_loop

    class Counting(queue.Queue):
        gets = 0

        def get(self, block: bool = True, timeout: float | None = None):
            Counting.gets += 1
            return super().get(block, timeout)

    class Transport:
        def send(self, item, consumer_id: int) -> None:  # LitServe's "started" notices
            pass

    monkeypatch.setattr(serve_loop, "IDLE_WAIT_S", 0.3)
    api = SimpleNamespace(max_batch_size=4, batch_timeout=0.05, request_timeout=30, stream=False)
    loop, requests = serve_loop.IdleWaitingBatchedLoop(), Counting()
    assert loop.get_batch_requests(api, requests, Transport()) == ([], [])
    assert Counting.gets == 1

    def arrive() -> None:
        time.sleep(0.1)
        for uid in ("a", "b"):
            requests.put((0, uid, time.monotonic(), uid.upper()))

    threading.Thread(target=arrive).start()
    batch, timed_out = loop.get_batch_requests(api, requests, Transport())
    assert [(uid, x) for _, uid, x in batch] == [("a", "A"), ("b", "B")] and timed_out == []


def test_sigterm_stops_the_server_and_its_workers(servers, runs_root: Path):
    server = servers("mnist1d_resnet_bn")
    assert children_of(server.proc.pid)  # HTTP and inference worker processes
    code, took, left = server.stop(signal.SIGTERM)
    assert code == 0 and took < 10 and not left, (code, took, left, server.log.read_text()[-2000:])
    assert "Traceback" not in server.log.read_text()
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))


def test_litserve_monitor_failing_on_its_stopped_manager_logs_no_traceback(caplog):
    """The race behind a Traceback after a clean stop (LitServe's monitor thread waking after its
    manager was shut down), reproduced the way the thread meets it; other failures are still logged."""
    import inspect
    import logging
    import multiprocessing

    import litserve

    from src.tools.serve import MonitorGoneAtShutdown

    # what the filter matches is what LitServe logs
    assert 'logger.exception("Monitoring worker crashed")' in inspect.getsource(litserve.server)
    logger = logging.getLogger("litserve.server")
    manager = multiprocessing.Manager()
    event = manager.Event()
    manager.shutdown()
    logger.addFilter(gone := MonitorGoneAtShutdown())
    try:
        with caplog.at_level(logging.ERROR, logger="litserve.server"):
            with pytest.raises((EOFError, OSError)):  # as in LitServe's thread: the manager is gone
                try:
                    event.is_set()
                except Exception:
                    logger.exception("Monitoring worker crashed")
                    raise
            assert not caplog.records
            try:
                raise RuntimeError("a real failure")
            except RuntimeError:
                logger.exception("Monitoring worker crashed")
            assert [r.exc_info[0] for r in caplog.records] == [RuntimeError]
    finally:
        logger.removeFilter(gone)


def test_bad_checkpoint_or_busy_port_stop_before_serving(runs_root: Path, tmp_path: Path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00" * 100)
    proc = run_module("src.tools.serve", "--ckpt_path", str(junk), check=False, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr

    ckpt = tiny_checkpoint("mnist1d_resnet_bn", runs_root)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_module(
            "src.tools.serve", "--ckpt_path", str(ckpt), "--port", str(port), check=False, timeout=60
        )
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
