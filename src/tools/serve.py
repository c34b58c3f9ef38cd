"""Serve a trained checkpoint over HTTP with LitServe: raw inputs in, class names and probabilities out.

    python -m src.tools.serve --ckpt_path lightning_logs/<run>/version_0/checkpoints/last.ckpt
    python -m src.tools.serve --ckpt_path <ckpt> --port 8080 --workers 2 --max_batch_size 32 --batch_timeout 0.005

    curl -s localhost:8000/health                                   # "ok" once the model is loaded
    curl -s localhost:8000/predict -H 'Content-Type: application/json' \\
         -d '{"inputs": ["Stocks slide as oil tops $50", "Champions league final tonight"]}'

``POST /predict`` takes ``{"inputs": [...]}``, a list of 1 to ``--max_inputs`` raw inputs of the
checkpoint's kind, as its DataModule reads them (``parse_raw_input``; ``GET /info`` says which):

- MNIST-1D (and any DataModule of fixed-shape float features): a (nested) list of numbers;
- Fashion-MNIST: a 28×28 grayscale image, as a base64 PNG string (or ``{"png": "<base64>"}``) or a
  28×28 array (or 784 values) of integer pixels 0-255;
- AG News: a text (JSON string).

It answers ``{"predictions": [{"predicted": "<class name>", "probabilities": {"<class>": p, ...}}, ...]}``,
one entry per input, in order: the probabilities ``python -m src.cli predict`` writes for the same
inputs. Requests are batched on the server (``--max_batch_size`` requests, or whatever arrived within
``--batch_timeout`` seconds, go through the model together). ``GET /health`` answers ``ok`` (200)
once the model is loaded; ``GET /info`` describes the model and the request format.

Every request is read in the HTTP process by :class:`RequestGuard`: its size on the event loop, then
its JSON and every input in a thread (so a large request never holds up the small ones). A bad
request gets a 4xx JSON answer ``{"detail": {"error": "...", "input_index": i}}`` there and never
reaches the model, so it cannot fail the other requests of its server batch: 400 for a body that is
empty, not UTF-8, not JSON (or nested too deeply), or without an ``inputs`` list; 413 for a body over
``--max_request_bytes`` or more than ``--max_inputs`` inputs; 422 for an input the DataModule refuses
(wrong type, shape, size, or too long). The inputs travel on to the inference worker already decoded.
SIGINT (Ctrl+C) or SIGTERM shut the server down cleanly. A missing or bad checkpoint, or a port in
use, stops it before it starts, with one ``error: ...`` message (exit status 2).

Needs the ``serve`` extra: ``pip install -e ".[serve]"``.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import socket
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.runtime.startup import fast_exit, heavy_imports

with heavy_imports():  # torch and Lightning: see src/runtime/startup.py
    import numpy as np
    import torch

    from src.data.base import ClassificationDataModule
    from src.data.raw_inputs import RawInputError, type_name
    from src.runtime.devices import cpu_threads
    from src.runtime.errors import UsageError, exit_on_error
    from src.tools.inference import load_for_inference

    try:
        import litserve as ls
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse
        from starlette.types import ASGIApp, Message, Receive, Scope, Send
    except ImportError as _err:  # the serve extra is optional: say what to install when it is used
        ls = None
        _IMPORT_ERROR: ImportError | None = _err
        _LitAPI: Any = object
    else:
        _IMPORT_ERROR = None
        _LitAPI = ls.LitAPI
        from src.tools.serve_loop import IdleWaitingBatchedLoop

API_PATH = "/predict"
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # ~1,000 Fashion-MNIST images as JSON arrays
DEFAULT_MAX_INPUTS = 256
REQUEST_FORMAT = '{"inputs": [<input>, ...]}'
log = logging.getLogger(__name__)


class InputError(UsageError):
    """A request the server refuses.

    Attributes:
        status: the HTTP status of the answer (400 malformed, 413 too large, 422 an input refused).
        index: position of the offending input in the request (``None``: the request as a whole).
    """

    def __init__(self, message: str, status: int = 422, index: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.index = index

    def detail(self) -> dict[str, Any]:
        """JSON-ready error detail for an HTTP response."""
        out: dict[str, Any] = {"error": str(self)}
        if self.index is not None:
            out["input_index"] = self.index
        return out


# ------------------------------------------------------------------------------ request → samples
def read_request(body: bytes, datamodule: ClassificationDataModule, max_inputs: int) -> list[np.ndarray]:
    """A request body → one decoded sample per input (``datamodule.parse_raw_input``).

    Raises:
        InputError: the body or one of its inputs is refused; the message says what was wrong.
    """
    if not body.strip():
        raise InputError(f"the request body is empty: send JSON {REQUEST_FORMAT}.", 400)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"the request body is not UTF-8 (byte {err.start}): send UTF-8 JSON.", 400) from None
    try:
        request = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"the request body is not JSON ({err.msg} at character {err.pos}).", 400) from None
    except RecursionError:
        raise InputError(
            f"the request body is nested too deeply to read (lists or objects more than "
            f"{sys.getrecursionlimit()} levels deep): send JSON {REQUEST_FORMAT}.",
            400,
        ) from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise InputError(f"the request body is not usable JSON ({err}).", 400) from None
    if not isinstance(request, dict) or "inputs" not in request:
        raise InputError(f"the body must be a JSON object {REQUEST_FORMAT}.", 400)
    values = request["inputs"]
    if not isinstance(values, list):
        raise InputError(f'"inputs" must be a list of inputs, got {type_name(values)}.', 400)
    if not values:
        raise InputError('"inputs" is empty: send at least one input.', 400)
    if len(values) > max_inputs:
        raise InputError(
            f"{len(values)} inputs in one request; at most {max_inputs} are accepted. Split the request.", 413
        )
    samples = []
    for index, value in enumerate(values):
        try:
            samples.append(datamodule.parse_raw_input(value))
        except RawInputError as err:
            raise InputError(f"input {index}: {err}", 422, index) from None
    return samples


# The decoded samples travel from the HTTP process to the inference worker in LitServe's JSON
# payload, each as dtype, shape and base64 bytes: cheap to write, read and queue whatever the input.
def pack(samples: Sequence[np.ndarray]) -> bytes:
    """Samples → the JSON body the inference worker's :meth:`ClassifierAPI.decode_request` reads."""
    return json.dumps(
        {
            "samples": [
                {"dtype": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}
                for a in map(np.ascontiguousarray, samples)
            ]
        }
    ).encode()


def unpack(payload: dict[str, Any]) -> list[np.ndarray]:
    """The samples :func:`pack` wrote."""
    return [
        np.frombuffer(base64.b64decode(s["data"]), dtype=np.dtype(s["dtype"])).reshape(s["shape"]).copy()
        for s in payload["samples"]
    ]


# ------------------------------------------------------------------------------ the API
@dataclass
class Batched:
    """The inputs of several requests that go through the model together (one list per request)."""

    groups: list[list[np.ndarray]]


class ClassifierAPI(_LitAPI):
    """LitServe API around a checkpoint: decoded samples in, batched through the model, probabilities out.

    Each inference worker loads the checkpoint in :meth:`setup` with
    :func:`src.tools.inference.load_for_inference` and builds the model's input batch with the
    DataModule's ``raw_inputs_to_batch``, so it computes what ``python -m src.cli predict`` computes.

    Args:
        ckpt_path: the checkpoint to serve.
        threads: torch CPU threads per inference worker.
        max_batch_size: the most requests batched into one model call.
        batch_timeout: seconds to wait for more requests to fill a batch.
    """

    def __init__(
        self, ckpt_path: str, threads: int = 1, max_batch_size: int = 16, batch_timeout: float = 0.002
    ) -> None:
        with warnings.catch_warnings():
            # with --max_batch_size 1 LitServe never calls batch/unbatch, and warns that they exist
            warnings.filterwarnings("ignore", message=r".*max_batch_size parameter was not set")
            loop = IdleWaitingBatchedLoop() if max_batch_size > 1 else "auto"  # 1: LitServe's blocking loop
            super().__init__(
                max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH, loop=loop
            )
        self.ckpt_path = ckpt_path
        self.threads = threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        model, datamodule = load_for_inference(self.ckpt_path)
        self.model = model.to(device)
        self.torch_device = torch.device(device)
        self.datamodule = datamodule
        self.class_names = list(model.class_names)

    # `request` stays unannotated: LitServe hands its annotation to FastAPI as the request type
    # (unannotated: the parsed JSON body, here what RequestGuard packed).
    def decode_request(self, request) -> list[np.ndarray]:
        return unpack(request)

    def batch(self, inputs: list[list[np.ndarray]]) -> Batched:
        return Batched(list(inputs))

    def predict(self, x: Batched | list[np.ndarray]) -> list[np.ndarray] | np.ndarray:
        groups = x.groups if isinstance(x, Batched) else [x]
        items = [item for group in groups for item in group]
        with torch.inference_mode():
            batch = self.datamodule.raw_inputs_to_batch(items).to(self.torch_device)
            probs = torch.softmax(self.model(batch).float(), dim=-1).cpu().numpy()  # as predict_step
        out, start = [], 0
        for group in groups:
            out.append(probs[start : start + len(group)])
            start += len(group)
        return out if isinstance(x, Batched) else out[0]

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    # No return annotation, for the same reason (it would become FastAPI's response model).
    # Serialised here, in the inference worker: the HTTP process then only sends the bytes.
    def encode_response(self, output: np.ndarray):
        names = self.class_names
        return JSONResponse(
            {
                "predictions": [
                    {
                        "predicted": names[int(row.argmax())],
                        "probabilities": {n: float(p) for n, p in zip(names, row.tolist(), strict=True)},
                    }
                    for row in output
                ]
            }
        )


class RequestGuard:
    """ASGI middleware that reads ``POST /predict`` requests in the HTTP process, before they are queued.

    On the event loop only the size is checked (413, before the body is read when ``Content-Length``
    says so, else as soon as the streamed body passes the limit). The JSON and every input are read
    by :func:`read_request` in a thread, so a large request never holds up the small ones; a bad
    request is answered here (4xx JSON, the connection kept open) and never reaches a server batch.
    A good one goes on to LitServe with its inputs decoded (:func:`pack`).
    """

    def __init__(
        self, app: ASGIApp, *, datamodule: ClassificationDataModule, max_bytes: int, max_inputs: int
    ) -> None:
        self.app = app
        self.datamodule = datamodule
        self.max_bytes = max_bytes
        self.max_inputs = max_inputs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != API_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _reject(scope, receive, send, InputError(self._too_large(int(declared)), 413))
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.max_bytes:
                await _reject(scope, receive, send, InputError(self._too_large(len(body)), 413))
                return
        try:
            payload = await run_in_threadpool(self._read, bytes(body))
        except InputError as err:
            await _reject(scope, receive, send, err)
            return
        except Exception as err:  # a fault in the DataModule's parse_raw_input: say so, keep serving
            log.exception("reading a request failed")
            detail = {"error": f"the server failed to read the inputs: {type(err).__name__}: {err}"}
            await JSONResponse({"detail": detail}, status_code=500)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await receive()

        headers = [
            (k, v) for k, v in scope.get("headers") or [] if k not in (b"content-type", b"content-length")
        ]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await self.app({**scope, "headers": headers}, replay, send)

    def _read(self, body: bytes) -> bytes:
        return pack(read_request(body, self.datamodule, self.max_inputs))

    def _too_large(self, size: int) -> str:
        return f"the request body has {size} bytes; at most {self.max_bytes} are accepted. Split the request."


async def _reject(scope: Scope, receive: Receive, send: Send, err: InputError) -> None:
    await JSONResponse({"detail": err.detail()}, status_code=err.status)(scope, receive, send)


# ------------------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m src.tools.serve",
        description='Serve a checkpoint with LitServe: POST /predict {"inputs": [...]}, GET /health.',
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `python -m src.cli fit`")
    parser.add_argument("--port", type=int, default=8000, help="default 8000 (1024-65535)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        choices=["127.0.0.1", "0.0.0.0", "::"],
        help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="inference worker processes per device (default 1)"
    )
    parser.add_argument(
        "--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default auto"
    )
    parser.add_argument("--devices", default="auto", help="number of devices (GPUs), or auto (default)")
    parser.add_argument(
        "--max_batch_size", type=int, default=16, help="requests batched into one model call (default 16)"
    )
    parser.add_argument(
        "--batch_timeout",
        type=float,
        default=0.002,
        help="seconds to wait for more requests to fill a batch (default 0.002)",
    )
    parser.add_argument(
        "--max_inputs", type=int, default=DEFAULT_MAX_INPUTS, help="inputs per request (default 256)"
    )
    parser.add_argument(
        "--max_request_bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"largest request body accepted (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait (default 30)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: BN_NUM_THREADS or auto)"
    )
    parser.add_argument("--log_level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    problems = [
        f"--port must be from 1024 to 65535, got {args.port}" if not 1024 <= args.port <= 65535 else "",
        f"--workers must be >= 1, got {args.workers}" if args.workers < 1 else "",
        f"--max_batch_size must be >= 1, got {args.max_batch_size}" if args.max_batch_size < 1 else "",
        f"--batch_timeout must be >= 0 and below --timeout, got {args.batch_timeout}"
        if not 0 <= args.batch_timeout < args.timeout
        else "",
        f"--max_inputs must be >= 1, got {args.max_inputs}" if args.max_inputs < 1 else "",
        f"--max_request_bytes must be >= 1, got {args.max_request_bytes}"
        if args.max_request_bytes < 1
        else "",
    ]
    if args.devices != "auto" and not str(args.devices).isdigit():
        problems.append(f"--devices must be a number or auto, got {args.devices!r}")
    if any(problems):
        raise UsageError(next(p for p in problems if p))
    return args


def _check_port(host: str, port: int) -> None:
    """Fail fast, with one message, when the port cannot be bound (uvicorn would exit from a worker)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UsageError(
                f"cannot listen on {host}:{port}: {err.strerror or err}. Stop what uses it or pass another --port."
            ) from None


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM shut down, LitServe stopping its HTTP and inference processes (SIGTERM
    would kill this process alone), SIGINT also where it was inherited ignored (``cmd &`` in a script)."""
    main_pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked child that inherited the handler: default behaviour
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one shutdown at a time
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


class MonitorGoneAtShutdown(logging.Filter):
    """Drop LitServe's "Monitoring worker crashed" when the crash is only its shutdown.

    LitServe 0.2's worker-monitoring thread (``LitServer._start_worker_monitoring``) polls the
    shutdown event of a multiprocessing manager every 2 s; when it wakes after the shutdown stopped
    that manager, the poll fails with a broken connection and it logs a traceback although nothing
    crashed, so a clean Ctrl+C or SIGTERM ended with a Traceback. Any other failure is still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        gone = isinstance(error, (EOFError, OSError))  # BrokenPipeError, ConnectionResetError, ...
        return not (gone and record.getMessage() == "Monitoring worker crashed")


def build_server(
    args: argparse.Namespace, datamodule: ClassificationDataModule, metadata: dict[str, Any]
) -> Any:
    """The LitServer for the parsed arguments (its API, batching, limits and request guard)."""
    api = ClassifierAPI(
        str(args.ckpt_path),
        threads=args.threads or cpu_threads(),
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    # LitServe forks its HTTP processes: the guard's DataModule is inherited, not pickled.
    guard = {"datamodule": datamodule, "max_bytes": args.max_request_bytes, "max_inputs": args.max_inputs}
    return ls.LitServer(
        api,
        accelerator=args.accelerator,
        devices=int(args.devices) if str(args.devices).isdigit() else "auto",
        workers_per_device=args.workers,
        timeout=args.timeout,
        middlewares=[(RequestGuard, guard)],
        model_metadata=metadata,
    )


def main(argv: list[str] | None = None) -> None:
    with exit_on_error():
        args = parse_args(argv)
        if _IMPORT_ERROR is not None:
            raise UsageError(
                f"serving needs the serve extra ({_IMPORT_ERROR.name} is not installed): pip install -e '.[serve]'"
            )
        model, datamodule = load_for_inference(args.ckpt_path)
        _check_port(args.host, args.port)
    metadata = {
        "checkpoint": Path(args.ckpt_path).name,
        "model": type(model).__name__,
        "class_names": list(model.class_names),
        "input": {k: v for k, v in datamodule.describe_raw_inputs().items() if k != "vocabulary"},
        "model_input": datamodule.model_input_spec(),
        "request": REQUEST_FORMAT,
        "max_inputs": args.max_inputs,
        "max_batch_size": args.max_batch_size,
        "batch_timeout": args.batch_timeout,
    }
    del model  # the inference workers load their own copy
    logging.getLogger("litserve").setLevel(args.log_level.upper())
    logging.getLogger("litserve.server").addFilter(MonitorGoneAtShutdown())
    server = build_server(args, datamodule, metadata)
    _stop_on_signals()
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "127.0.0.1") else f"[{args.host}]"
    print(
        f"Serving {metadata['model']} from {args.ckpt_path} on http://{shown}:{args.port}{API_PATH} "
        f"({args.workers} worker(s), batches of up to {args.max_batch_size} requests); "
        f"GET /health answers ok when ready; Ctrl+C stops.",
        flush=True,
    )
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level=args.log_level)
    print("Server stopped.", flush=True)


if __name__ == "__main__":
    # Run through the package module, so the API class pickled into LitServe's spawned inference
    # workers is `src.tools.serve.ClassifierAPI`, not `__main__.ClassifierAPI`.
    from src.tools.serve import main as _main

    with fast_exit():
        _main()
