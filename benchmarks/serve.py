"""Latency and throughput of the prediction server (``python -m src.tools.serve``) on this machine.

    python -m benchmarks.serve --ckpt_path <fashion or ag_news ckpt>
    python -m benchmarks.serve --ckpt_path <ckpt> --requests 400 --clients 8 --variant "b1=--max_batch_size 1"

For each server variant (default: server-side batching on, ``--max_batch_size 16 --batch_timeout
0.002``, and off, ``--max_batch_size 1``) it starts the real server in a subprocess, waits for
``/health``, warms it up, and measures with a keep-alive ``httpx`` client:

- ``sequential``: one client, one input per request, each sent when the previous answer arrived
  (batch 1: the latency a lone caller sees);
- ``concurrent``: ``--clients`` threads, one input per request, back to back (server-side batching
  can group their requests);
- ``client batch``: one client, ``--batch-inputs`` inputs per request (the caller batches);

and, before them, the CPU the idle server uses (``--idle-seconds``).

Each phase prints requests/s and inputs/s over its wall time, latency p50/p95 per request, and the
CPU seconds the server's processes used per 1,000 inputs. Inputs are real test samples of the
checkpoint (texts for AG News; PNGs, or pixel arrays with ``--image-format array``, for
Fashion-MNIST; signals for MNIST-1D). The client runs on the same machine as the server and
competes with it for the CPUs; ``uptime``'s load is printed before and after every variant.
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


def raw_inputs(ckpt: str, n: int, image_format: str) -> list[Any]:
    """``n`` JSON-ready raw inputs from the checkpoint's test split."""
    import numpy as np

    from src.data.ag_news import AGNews
    from src.tools.inference import load_for_inference

    _, datamodule = load_for_inference(ckpt)
    datamodule.setup("test")
    if isinstance(datamodule, AGNews):
        return list(datamodule.texts("test")[:n])
    raw = datamodule.splits["test"][0][:n].numpy()
    if raw.ndim == 2:  # signals
        return [x.tolist() for x in raw]
    if image_format == "array":
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


def run_phase(url: str, bodies: list[dict], clients: int, pid: int) -> dict[str, float]:
    """Send ``bodies`` from ``clients`` threads (each keep-alive, back to back); time everything."""
    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def worker(mine: list[dict]) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for body in mine:
                start = time.perf_counter()
                r = client.post("/predict", json=body)
                took = time.perf_counter() - start
                if r.status_code != 200:
                    errors.append(r.text[:200])
                with lock:
                    latencies.append(took)

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
    q = statistics.quantiles(latencies, n=20)
    return {
        "requests_s": len(bodies) / wall,
        "inputs_s": inputs / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": q[18] * 1000,
        "server_cpu_s_per_1k_inputs": cpu / inputs * 1000,
    }


def bench_variant(args: argparse.Namespace, label: str, server_args: list[str], inputs: list[Any]) -> None:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BN_NUM_THREADS": str(args.threads)}
    cmd = [
        sys.executable,
        "-m",
        "src.tools.serve",
        "--ckpt_path",
        args.ckpt_path,
        "--port",
        str(port),
        *server_args,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {shlex.join(cmd)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not get healthy in 180 s")
            time.sleep(0.2)
        singles = [{"inputs": [inputs[i % len(inputs)]]} for i in range(args.requests)]
        batches = [
            {"inputs": [inputs[(i * args.batch_inputs + j) % len(inputs)] for j in range(args.batch_inputs)]}
            for i in range(max(4, args.requests // args.batch_inputs))
        ]
        run_phase(url, singles[: args.warmup], 1, proc.pid)  # warm-up
        cpu0 = process_tree_cpu(proc.pid)
        time.sleep(args.idle_seconds)
        idle = (process_tree_cpu(proc.pid) - cpu0) / args.idle_seconds
        print(f"\n## {label}: server {' '.join(server_args) or '(defaults)'}; load before: {load()}")
        print(f"idle: the server's processes use {idle:.2f} CPU cores while no request arrives")
        print(
            "| phase | clients | inputs/request | requests/s | inputs/s | p50 ms | p95 ms | server CPU s / 1k inputs |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for phase, bodies, clients in (
            ("sequential", singles, 1),
            ("concurrent", singles, args.clients),
            ("client batch", batches, 1),
        ):
            r = run_phase(url, bodies, clients, proc.pid)
            per = len(bodies[0]["inputs"])
            print(
                f"| {phase} | {clients} | {per} | {r['requests_s']:.0f} | {r['inputs_s']:.0f} | "
                f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['server_cpu_s_per_1k_inputs']:.2f} |",
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
        "--threads", type=int, default=1, help="torch threads per inference worker (default 1)"
    )
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="idle CPU measured over this long")
    parser.add_argument("--image-format", choices=["png", "array"], default="png")
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        help='"label=server args", repeatable (default: batched and unbatched)',
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    inputs = raw_inputs(args.ckpt_path, 1000, args.image_format)
    print(
        f"# python -m benchmarks.serve {' '.join(shlex.quote(a) for a in sys.argv[1:])}\n"
        f"{os.cpu_count()} CPUs, torch threads per worker {args.threads}, {len(inputs)} distinct test inputs"
    )
    for spec in args.variant or DEFAULT_VARIANTS:
        label, _, server_args = spec.partition("=")
        bench_variant(args, label, shlex.split(server_args), inputs)


if __name__ == "__main__":
    main()
