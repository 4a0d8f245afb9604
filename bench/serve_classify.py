"""`/v1/classify` under many small requests: waiting requests classified together, or one call each (the default).

    .venv/bin/python bench/serve_classify.py digits/sdn.eec --data digits/test.npz --clients 32 --seconds 30
    .venv/bin/python bench/serve_classify.py stdlib-bert/pabee.eec --data stdlib-bert/test.jsonl

Each setting runs its own `eec serve` process (``--max-samples 256`` and ``--max-samples 1``, the
default: one request a call), one after the other; the clients are asyncio tasks in this process, each
sending one sample a request back to back (the way a service classifies what its users send).
Reported: samples/s, request latency p50 / p99, and how many samples the server's calls held on
average (from ``usage.batch``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server  # noqa: E402


async def load(url: str, samples, clients: int, seconds: float, eps: float) -> dict:
    latency, batches, done = [], [], [0]
    stop_at = time.monotonic() + seconds

    async def client(k: int, http: httpx.AsyncClient):
        i = k
        while time.monotonic() < stop_at:
            start = time.monotonic()
            sample = samples[i % len(samples)]
            body = {"input": sample if isinstance(sample, str) else sample.tolist(), "epsilon": eps}
            r = await http.post(url + "/v1/classify", json=body)
            r.raise_for_status()
            latency.append(time.monotonic() - start)
            batches.append(r.json()["usage"]["batch"])
            done[0] += 1
            i += clients

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = time.monotonic()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        wall = time.monotonic() - start
    q = statistics.quantiles(latency, n=100)
    return {"rate": done[0] / wall, "p50": q[49], "p99": q[98], "batch": float(np.mean(batches))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--data", type=Path, required=True, help="an npz whose x holds samples, or a JSONL file of texts")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--eps", type=float, default=0.99)
    args = p.parse_args()
    if args.data.suffix == ".jsonl":  # a text classifier: the texts of a labelled file
        samples = [json.loads(line)["text"] for line in open(args.data, encoding="utf-8")]
    else:
        samples = np.load(args.data)["x"].astype(np.float32)
    rows = []
    for max_samples in (256, 1):
        server, url = start_server(args.artifact, ["--max-samples", str(max_samples)])
        try:
            asyncio.run(load(url, samples, args.clients, 3, args.eps))  # warm
            rows.append((max_samples, asyncio.run(load(url, samples, args.clients, args.seconds, args.eps))))
        finally:
            server.terminate()
            server.wait(30)
    print(f"\n{args.artifact.name}: {args.clients} clients, one sample a request, ε {args.eps}, {args.seconds:g} s\n")
    print("| --max-samples | samples/s | latency p50 / p99 ms | samples a call |")
    print("|---|---|---|---|")
    for max_samples, r in rows:
        print(f"| {max_samples} | {r['rate']:.0f} | {r['p50'] * 1e3:.1f} / {r['p99'] * 1e3:.1f} | {r['batch']:.1f} |")
    print(f"\nmerged / one a call: {rows[0][1]['rate'] / rows[1][1]['rate']:.2f}x")


if __name__ == "__main__":
    main()
