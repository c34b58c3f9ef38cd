"""Latency and throughput of the prediction server (``python -m src.tools.serve``) on this machine.

    python -m benchmarks.serve --ckpt_path <fashion or ag_news ckpt>
    python -m benchmarks.serve --ckpt_path <ckpt> --requests 400 --clients 8 --variant "b1=--max_batch_size 1"
    python -m benchmarks.serve --ckpt_path <ckpt> --phases sequential,under_load --checkout /path/to/other/checkout

For each server variant (default: server-side batching on, ``--max_batch_size 16 --batch_timeout
0.002``, and off, ``--max_batch_size 1``) it starts the real server in a subprocess, waits for
``/health``, warms it up, and measures with a keep-alive ``httpx`` client:

- ``sequential``: one client, one input per request, each sent when the previous answer arrived
  (batch 1: the latency a lone caller sees);
- ``concurrent``: ``--clients`` threads, one input per request, back to back (server-side batching
  can group their requests);
- ``client batch``: one client, ``--batch-inputs`` inputs per request (the caller batches);
- ``under load``: one client sends single-input requests one after the other while
  ``--large-clients`` other clients keep large requests (``--large-inputs`` inputs each; pixel
  arrays for images) in flight: the latency a small caller sees beside large ones;

and, before them, the CPU the idle server uses (``--idle-seconds``).

Each phase prints requests/s and inputs/s over its wall time, latency p50/p95/p99 per request, and
the CPU seconds the server's processes used per 1,000 inputs (for ``under load``: of the small
requests, with the large requests' count and p50 beside). Inputs are real test samples of the
checkpoint (texts for AG News; PNGs, or pixel arrays with ``--image-format array``, for
Fashion-MNIST; signals for MNIST-1D). ``--checkout DIR`` starts the server from another source tree
(e.g. a main checkout, to compare a change with it). The client runs on the same machine as the
server and competes with it for the CPUs; ``uptime``'s load is printed before and after every
variant.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = [
    "batched=--max_batch_size 16 --batch_timeout 0.002",
    "unbatched=--max_batch_size 1",
]
PHASES = ("sequential", "concurrent", "client_batch", "under_load")


def raw_inputs(ckpt: str, n: int, image_format: str) -> list[Any]:
    """``n`` JSON-ready raw inputs from the checkpoint's test split."""
    import numpy as np

    from src.tools.inference import load_for_inference

    _, datamodule = load_for_inference(ckpt)
    datamodule.setup("test")
    if datamodule.input_kind == "tokens":  # a text DataModule keeps the raw texts of its splits
        return list(datamodule.texts("test")[:n])
    raw = datamodule.splits["test"][0][:n].numpy()
    if raw.ndim == 2 or image_format == "array":  # signals, or pixel arrays
        return [x.tolist() for x in raw]
    from PIL import Image

    out = []
    for x in raw:
        buf = io.BytesIO()
        Image.fromarray(x.astype(np.uint8), mode="L").save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its live descendants (Linux /proc)."""
    stats: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, frontier = {pid}, {pid}
    while frontier:
        frontier = {p for p, (pp, _) in stats.items() if pp in frontier} - tree
        tree |= frontier
    return sum(stats[p][1] for p in tree if p in stats)


def load() -> str:
    return (
        subprocess.run(["uptime"], capture_output=True, text=True)
        .stdout.strip()
        .split("load average:")[-1]
        .strip()
    )


def _quantiles(latencies: list[float]) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"p50_ms": q[49] * 1000, "p95_ms": q[94] * 1000, "p99_ms": q[98] * 1000}


def _send(client: Any, body: dict, latencies: list[float], errors: list[str]) -> None:
    start = time.perf_counter()
    r = client.post("/predict", json=body)
    latencies.append(time.perf_counter() - start)
    if r.status_code != 200:
        errors.append(r.text[:200])


def run_phase(url: str, bodies: list[dict], clients: int, pid: int) -> dict[str, float]:
    """Send ``bodies`` from ``clients`` threads (each keep-alive, back to back); time everything."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []

    def worker(mine: list[dict]) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for body in mine:
                _send(client, body, latencies, errors)

    threads = [threading.Thread(target=worker, args=(bodies[k::clients],)) for k in range(clients)]
    cpu0, wall0 = process_tree_cpu(pid), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - wall0, process_tree_cpu(pid) - cpu0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    inputs = sum(len(b["inputs"]) for b in bodies)
    return {
        "requests_s": len(bodies) / wall,
        "inputs_s": inputs / wall,
        **_quantiles(latencies),
        "server_cpu_s_per_1k_inputs": cpu / inputs * 1000,
    }


def run_under_load(
    url: str, small: list[dict], large: dict, large_clients: int, pid: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Small requests one after the other while ``large_clients`` threads send ``large`` back to back.

    Returns the small requests' figures (as :func:`run_phase`) and the large requests' count and p50.
    """
    import httpx

    small_lat: list[float] = []
    large_lat: list[float] = []
    errors: list[str] = []
    stop = threading.Event()

    def large_worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while not stop.is_set():
                _send(client, large, large_lat, errors)

    threads = [threading.Thread(target=large_worker) for _ in range(large_clients)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the large requests are in flight before the first small one is sent
    cpu0, wall0 = process_tree_cpu(pid), time.perf_counter()
    with httpx.Client(base_url=url, timeout=120) as client:
        for body in small:
            _send(client, body, small_lat, errors)
    wall, cpu = time.perf_counter() - wall0, process_tree_cpu(pid) - cpu0
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    figures = {
        "requests_s": len(small) / wall,
        "inputs_s": len(small) / wall,
        **_quantiles(small_lat),
        "server_cpu_s_per_1k_inputs": cpu / len(small) * 1000,
    }
    return figures, {"count": len(large_lat), **_quantiles(large_lat)}


def start_server(args: argparse.Namespace, server_args: list[str]) -> tuple[subprocess.Popen, str]:
    """The server of ``--checkout`` on a free port, once ``/health`` answers ok."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    checkout = Path(args.checkout).resolve()
    env = {**os.environ, "PYTHONPATH": str(checkout), "BN_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "src.tools.serve", "--ckpt_path", args.ckpt_path, "--port", str(port)]
    cmd += server_args
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {shlex.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).text == "ok":
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError("the server did not get healthy in 180 s")
        time.sleep(0.2)


def bench_variant(
    args: argparse.Namespace, label: str, server_args: list[str], inputs: list[Any], large_inputs: list[Any]
) -> None:
    abs_ckpt = str(Path(args.ckpt_path).resolve())
    args = argparse.Namespace(**{**vars(args), "ckpt_path": abs_ckpt})
    proc, url = start_server(args, server_args)
    try:
        singles = [{"inputs": [inputs[i % len(inputs)]]} for i in range(args.requests)]
        batches = [
            {"inputs": [inputs[(i * args.batch_inputs + j) % len(inputs)] for j in range(args.batch_inputs)]}
            for i in range(max(4, args.requests // args.batch_inputs))
        ]
        large = {"inputs": [large_inputs[j % len(large_inputs)] for j in range(args.large_inputs)]}
        run_phase(url, singles[: args.warmup], 1, proc.pid)  # warm-up
        cpu0 = process_tree_cpu(proc.pid)
        time.sleep(args.idle_seconds)
        idle = (process_tree_cpu(proc.pid) - cpu0) / args.idle_seconds
        print(f"\n## {label}: server {' '.join(server_args) or '(defaults)'}; load before: {load()}")
        print(f"idle: the server's processes use {idle:.2f} CPU cores while no request arrives")
        print(
            "| phase | clients | inputs/request | requests/s | inputs/s | p50 ms | p95 ms | p99 ms "
            "| server CPU s / 1k inputs |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for phase in args.phases:
            if phase == "under_load":
                r, big = run_under_load(url, singles, large, args.large_clients, proc.pid)
                name, clients = f"under load ({args.large_clients} x {args.large_inputs} inputs in flight)", 1
            else:
                bodies, clients = {
                    "sequential": (singles, 1),
                    "concurrent": (singles, args.clients),
                    "client_batch": (batches, 1),
                }[phase]
                r, name = run_phase(url, bodies, clients, proc.pid), phase.replace("_", " ")
            per = args.batch_inputs if phase == "client_batch" else 1
            print(
                f"| {name} | {clients} | {per} | {r['requests_s']:.0f} | {r['inputs_s']:.0f} | "
                f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
                f"{r['server_cpu_s_per_1k_inputs']:.2f} |",
                flush=True,
            )
            if phase == "under_load":
                print(
                    f"  (large requests meanwhile: {big['count']} answered, p50 {big['p50_ms']:.0f} ms, "
                    f"p99 {big['p99_ms']:.0f} ms)",
                    flush=True,
                )
        print(f"load after: {load()}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--requests", type=int, default=300, help="requests per phase (default 300)")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--clients", type=int, default=8, help="threads of the concurrent phase (default 8)")
    parser.add_argument("--batch-inputs", type=int, default=32, help="inputs per request, client batch phase")
    parser.add_argument(
        "--large-inputs", type=int, default=256, help="inputs per large request, under load (default 256)"
    )
    parser.add_argument(
        "--large-clients", type=int, default=1, help="clients sending large requests, under load (default 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per inference worker (default 1)"
    )
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="idle CPU measured over this long")
    parser.add_argument("--image-format", choices=["png", "array"], default="png")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated phases to run (default: all of {','.join(PHASES)})",
    )
    parser.add_argument(
        "--checkout", default=str(ROOT), help="source tree whose server is started (default: this one)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        help='"label=server args", repeatable (default: batched and unbatched)',
    )
    args = parser.parse_args()
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    sys.path.insert(0, str(ROOT))
    inputs = raw_inputs(args.ckpt_path, 1000, args.image_format)
    large_inputs = raw_inputs(args.ckpt_path, args.large_inputs, "array")
    print(
        f"# python -m benchmarks.serve {' '.join(shlex.quote(a) for a in sys.argv[1:])}\n"
        f"{os.cpu_count()} CPUs, torch threads per worker {args.threads}, {len(inputs)} distinct test inputs, "
        f"server from {Path(args.checkout).resolve()}"
    )
    for spec in args.variant or DEFAULT_VARIANTS:
        label, _, server_args = spec.partition("=")
        bench_variant(args, label, shlex.split(server_args), inputs, large_inputs)


if __name__ == "__main__":
    main()
