"""Serve a trained checkpoint over HTTP with LitServe: raw inputs in, class names and probabilities out.

    python -m src.tools.serve --ckpt_path lightning_logs/<run>/version_0/checkpoints/last.ckpt
    python -m src.tools.serve --ckpt_path <ckpt> --port 8080 --workers 2 --max_batch_size 32 --batch_timeout 0.005

    curl -s localhost:8000/health                                   # "ok" once the model is loaded
    curl -s localhost:8000/predict -H 'Content-Type: application/json' \\
         -d '{"inputs": ["Stocks slide as oil tops $50", "Champions league final tonight"]}'

``POST /predict`` takes ``{"inputs": [...]}``, a list of 1 to ``--max_inputs`` raw inputs of the
checkpoint's kind:

- MNIST-1D: a list of 40 numbers (the signal);
- Fashion-MNIST: a 28×28 grayscale image, as a base64 PNG string (or ``{"png": "<base64>"}``) or a
  28×28 array (or 784 values) of integer pixels 0-255;
- AG News: a text (JSON string).

It answers ``{"predictions": [{"predicted": "<class name>", "probabilities": {"<class>": p, ...}}, ...]}``,
one entry per input, in order: the probabilities ``python -m src.cli predict`` writes for the same
inputs. Requests are batched on the server (``--max_batch_size`` requests, or whatever arrived within
``--batch_timeout`` seconds, go through the model together). ``GET /health`` answers ``ok`` (200)
once the model is loaded; ``GET /info`` describes the model and the request format.

A bad request gets a 4xx JSON answer ``{"detail": {"error": "...", "input_index": i}}`` and never
reaches the model, so it cannot fail the other requests of its server batch: 400 for a body that is
empty, not UTF-8 or not JSON, or without an ``inputs`` list; 413 for a body over
``--max_request_bytes`` or more than ``--max_inputs`` inputs; 422 for an input of the wrong type or
shape. SIGINT (Ctrl+C) or SIGTERM shut the server down cleanly. A missing or bad checkpoint, or a
port in use, stops it before it starts, with one ``error: ...`` message (exit status 2).

Needs the ``serve`` extra: ``pip install -e ".[serve]"``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.runtime.devices import cpu_threads
from src.tools.inference import InferenceError, InputEncoder, InputError, encoder_for, load_for_inference

try:
    import litserve as ls
    from fastapi import HTTPException
    from starlette.responses import JSONResponse
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as _err:  # the serve extra is optional: say what to install when it is used
    ls = None
    _IMPORT_ERROR: ImportError | None = _err
    _LitAPI: Any = object
else:
    _IMPORT_ERROR = None
    _LitAPI = ls.LitAPI

API_PATH = "/predict"
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # ~1,000 Fashion-MNIST images as JSON arrays
DEFAULT_MAX_INPUTS = 256
REQUEST_FORMAT = '{"inputs": [<input>, ...]}'


@dataclass
class Batched:
    """The inputs of several requests that go through the model together (one list per request)."""

    groups: list[list[Any]]


class ClassifierAPI(_LitAPI):
    """LitServe API around a checkpoint: decode (validate + canonicalise), batch, predict, encode.

    Each inference worker loads the checkpoint in :meth:`setup` with
    :func:`src.tools.inference.load_for_inference` and encodes inputs with the DataModule's encoder, so it
    computes what ``python -m src.cli predict`` computes.

    Args:
        ckpt_path: the checkpoint to serve.
        max_inputs: the most inputs one request may hold.
        threads: torch CPU threads per inference worker.
        max_batch_size: the most requests batched into one model call.
        batch_timeout: seconds to wait for more requests to fill a batch.
    """

    def __init__(
        self,
        ckpt_path: str,
        max_inputs: int = DEFAULT_MAX_INPUTS,
        threads: int = 1,
        max_batch_size: int = 16,
        batch_timeout: float = 0.002,
    ) -> None:
        with warnings.catch_warnings():
            # with --max_batch_size 1 LitServe never calls batch/unbatch, and warns that they exist
            warnings.filterwarnings("ignore", message=r".*max_batch_size parameter was not set")
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
        self.ckpt_path = ckpt_path
        self.max_inputs = max_inputs
        self.threads = threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        model, datamodule = load_for_inference(self.ckpt_path)
        self.model = model.to(device)
        self.torch_device = torch.device(device)
        self.encoder: InputEncoder = encoder_for(datamodule)
        self.class_names = list(model.class_names)

    # `request` stays unannotated: LitServe hands its annotation to FastAPI as the request type
    # (unannotated: the parsed JSON body).
    def decode_request(self, request) -> list[Any]:
        # RequestGuard already rejected bad requests in the HTTP process; this check only matters
        # if the API is mounted without it (an error here would fail the whole server batch).
        try:
            return self.encoder.parse(_inputs_of(request), self.max_inputs)
        except InputError as err:
            raise HTTPException(status_code=err.status, detail=err.detail()) from None

    def batch(self, inputs: list[list[Any]]) -> Batched:
        return Batched(list(inputs))

    def predict(self, x: Batched | list[Any]) -> list[np.ndarray] | np.ndarray:
        groups = x.groups if isinstance(x, Batched) else [x]
        items = [item for group in groups for item in group]
        with torch.inference_mode():
            batch = self.encoder.encode(items).to(self.torch_device)
            probs = torch.softmax(self.model(batch).float(), dim=-1).cpu().numpy()  # as predict_step
        out, start = [], 0
        for group in groups:
            out.append(probs[start : start + len(group)])
            start += len(group)
        return out if isinstance(x, Batched) else out[0]

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    # No return annotation, for the same reason (it would become FastAPI's response model).
    def encode_response(self, output: np.ndarray):
        names = self.class_names
        return {
            "predictions": [
                {
                    "predicted": names[int(row.argmax())],
                    "probabilities": {n: float(p) for n, p in zip(names, row.tolist(), strict=True)},
                }
                for row in output
            ]
        }


def _inputs_of(request: Any) -> Any:
    if not isinstance(request, dict) or "inputs" not in request:
        raise InputError(f"the body must be a JSON object {REQUEST_FORMAT}.", 400)
    return request["inputs"]


class RequestGuard:
    """ASGI middleware that checks ``POST /predict`` bodies in the HTTP process, before they are queued.

    Size (413, before the body is read when ``Content-Length`` says so), encoding (400), JSON (400),
    the request format and every input (:meth:`InputEncoder.parse`: 413/422) are checked here. LitServe
    would answer a body that is not JSON with a 500, and an error raised while decoding one request
    of a server batch fails every request of that batch, so bad requests are answered here and
    never reach the model. Good bodies are passed on unchanged (as JSON, whatever their
    ``Content-Type``: ``curl -d`` sends a form type by default).
    """

    def __init__(self, app: ASGIApp, *, encoder: InputEncoder, max_bytes: int, max_inputs: int) -> None:
        self.app = app
        self.encoder = encoder
        self.max_bytes = max_bytes
        self.max_inputs = max_inputs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != API_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send, InputError(self._too_large(int(declared)), 413))
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
                await self._reject(scope, receive, send, InputError(self._too_large(len(body)), 413))
                return
        try:
            self.check(bytes(body))
        except InputError as err:
            await self._reject(scope, receive, send, err)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"] + [
            (b"content-type", b"application/json")
        ]
        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> str:
        return f"the request body has {size} bytes; at most {self.max_bytes} are accepted. Split the request."

    def check(self, body: bytes) -> None:
        """Raise :class:`InputError` unless ``body`` is a valid request."""
        if not body.strip():
            raise InputError(f"the request body is empty: send JSON {REQUEST_FORMAT}.", 400)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(
                f"the request body is not UTF-8 (byte {err.start}): send UTF-8 JSON.", 400
            ) from err
        try:
            request = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(
                f"the request body is not JSON ({err.msg} at character {err.pos}).", 400
            ) from err
        self.encoder.parse(_inputs_of(request), self.max_inputs)

    @staticmethod
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
        _fail(next(p for p in problems if p))
    return args


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _check_port(host: str, port: int) -> None:
    """Fail fast, with one message, when the port cannot be bound (uvicorn would exit from a worker)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            sock.bind((host, port))
        except OSError as err:
            _fail(
                f"cannot listen on {host}:{port}: {err.strerror or err}. Stop what uses it or pass another --port."
            )


def _stop_on_sigterm() -> None:
    """SIGTERM shuts down like Ctrl+C: LitServe then stops its HTTP and inference processes (by
    default SIGTERM would kill this process alone and leave them running)."""
    main_pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked child that inherited the handler: default behaviour
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one shutdown at a time
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def build_server(args: argparse.Namespace, encoder: InputEncoder, metadata: dict[str, Any]) -> Any:
    """The LitServer for the parsed arguments (its API, batching, limits and request guard)."""
    api = ClassifierAPI(
        str(args.ckpt_path),
        max_inputs=args.max_inputs,
        threads=args.threads or cpu_threads(),
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    guard = {"encoder": encoder, "max_bytes": args.max_request_bytes, "max_inputs": args.max_inputs}
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
    args = parse_args(argv)
    if _IMPORT_ERROR is not None:
        _fail(
            f"serving needs the serve extra ({_IMPORT_ERROR.name} is not installed): pip install -e '.[serve]'"
        )
    try:
        model, datamodule = load_for_inference(args.ckpt_path)
        encoder = encoder_for(datamodule)
    except InferenceError as err:
        _fail(str(err))
    _check_port(args.host, args.port)
    metadata = {
        "checkpoint": Path(args.ckpt_path).name,
        "model": type(model).__name__,
        "class_names": list(model.class_names),
        "input": {k: v for k, v in encoder.describe().items() if k != "vocabulary"},
        "request": REQUEST_FORMAT,
        "max_inputs": args.max_inputs,
        "max_batch_size": args.max_batch_size,
        "batch_timeout": args.batch_timeout,
    }
    del model, datamodule  # the inference workers load their own copy
    logging.getLogger("litserve").setLevel(args.log_level.upper())
    server = build_server(args, encoder, metadata)
    _stop_on_sigterm()
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

    _main()
