"""Load on `eec serve` over loopback: N streaming clients for a while, then more than it admits.

    .venv/bin/python bench/serve_load.py ARTIFACT [--clients 64 --seconds 120] [--overload 256 --overload-seconds 30]

The server runs in its own process (`eec serve`, so it and the clients do not
share an interpreter); the clients are asyncio tasks in this one, each sending
streamed completions back to back, and a share of them (``--abandon``) walks
away after a few tokens. Reported per phase: completed and failed requests,
refusals (429/503), aggregate tokens/s, time to first token and request latency
(p50/p99), and the server's resident memory at idle, under load and after;
after the last phase the server must be alive, with nothing running or queued.
Below capacity, zero failures is the goal; above it, refusals rather than
failures or a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Explain photosynthesis in one sentence.", "Write a haiku about the sea.", "What is the capital of France?",
           "List three prime numbers.", "Give me a tip for learning Python.", "Why is the sky blue?",
           "Describe a cat to someone who has never seen one.", "What does a compiler do?"]


@dataclass
class Phase:
    name: str
    clients: int
    seconds: float
    done: int = 0
    failed: int = 0
    refused: int = 0
    abandoned: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    rss_mb: list[float] = field(default_factory=list)
    wall: float = 0.0

    def row(self) -> str:
        q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) >= 2 else float("nan")  # noqa: E731
        return (f"| {self.name} | {self.clients} | {self.done} | {self.failed} | {self.refused} | {self.abandoned} | "
                f"{self.tokens / self.wall:.0f} | {q(self.ttft, 50):.2f} / {q(self.ttft, 99):.2f} | "
                f"{q(self.latency, 50):.2f} / {q(self.latency, 99):.2f} | {max(self.rss_mb, default=0):.0f} |")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, options: list[str]) -> tuple[subprocess.Popen, str]:
    """`eec serve ARTIFACT` with ``options`` on a free loopback port, once its /health answers."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [str(ROOT / ".venv/bin/eec"), "serve", str(artifact), "--port", url.rsplit(":", 1)[1], *options]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            sys.exit(f"the server exited: {server.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            sys.exit("the server did not come up")
        time.sleep(0.5)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def client(http: httpx.AsyncClient, url: str, phase: Phase, stop_at: float, args, rng: random.Random):
    while time.monotonic() < stop_at:
        abandon = rng.random() < args.abandon
        body = {"prompt": rng.choice(PROMPTS), "max_tokens": args.max_tokens, "stream": True,
                "temperature": 0, "epsilon": args.eps}
        start = time.monotonic()
        first, n = None, 0
        try:
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code in (429, 503):
                    phase.refused += 1
                    await r.aread()
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")) * rng.uniform(0.5, 1.5))
                    continue
                if r.status_code != 200:
                    phase.failed += 1
                    key = f"HTTP {r.status_code}"
                    phase.errors[key] = phase.errors.get(key, 0) + 1
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    n += len(chunk["choices"][0].get("token_ids") or [])
                    if first is None:
                        first = time.monotonic() - start
                    if abandon and n >= 4:
                        break  # leaving the block closes the connection mid-stream
            phase.tokens += n
            if abandon:
                phase.abandoned += 1
                continue
            phase.done += 1
            phase.ttft.append(first if first is not None else float("nan"))
            phase.latency.append(time.monotonic() - start)
        except Exception as e:  # noqa: BLE001 - counted and shown
            phase.failed += 1
            key = f"{type(e).__name__}: {str(e)[:80]}"
            phase.errors[key] = phase.errors.get(key, 0) + 1


async def run_phase(url: str, phase: Phase, pid: int, args) -> None:
    limits = httpx.Limits(max_connections=phase.clients + 8, max_keepalive_connections=phase.clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=30), limits=limits) as http:
        start = time.monotonic()
        stop_at = start + phase.seconds
        tasks = [asyncio.create_task(client(http, url, phase, stop_at, args, random.Random(i)))
                 for i in range(phase.clients)]
        while not all(t.done() for t in tasks):
            phase.rss_mb.append(rss_mb(pid))
            await asyncio.sleep(1)
        await asyncio.gather(*tasks)
        phase.wall = time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--overload", type=int, default=256)
    p.add_argument("--overload-seconds", type=float, default=30)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64, help="the server's queue: the overload phase goes past it")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--eps", type=float, default=0.9)
    p.add_argument("--abandon", type=float, default=0.1, help="share of requests whose client leaves mid-stream")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="run the first phase this many times (memory that keeps "
                   "growing from one to the next is a leak; memory that settles is a working set)")
    args = p.parse_args()

    options = ["--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    if args.threads:
        options += ["--threads", str(args.threads)]
    server, url = start_server(args.artifact, options)
    try:
        # Warm: a full batch for a few seconds, so that onnxruntime's arena holds what a full batch
        # needs (it keeps its peak) before the idle level is read; growth past it would be a leak.
        warm = Phase("warm", args.max_batch, 10)
        asyncio.run(run_phase(url, warm, server.pid, argparse.Namespace(**{**vars(args), "abandon": 0})))
        time.sleep(2)
        idle = rss_mb(server.pid)
        phases = [Phase(f"{args.clients} clients" + (f" ({k + 1})" if args.repeat > 1 else ""), args.clients,
                        args.seconds) for k in range(args.repeat)]
        if args.overload:
            phases.append(Phase(f"{args.overload} clients (overload)", args.overload, args.overload_seconds))
        settled = []
        for phase in phases:
            print(f"{phase.name} for {phase.seconds:g} s ...", file=sys.stderr, flush=True)
            asyncio.run(run_phase(url, phase, server.pid, args))
            time.sleep(2)
            settled.append(rss_mb(server.pid))
        health = httpx.get(url + "/health", timeout=10).json()
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(30)

    print(f"\n{args.artifact.name}: max batch {args.max_batch}, queue {args.max_queue}, {args.max_tokens} tokens a "
          f"request, ε {args.eps}, {args.abandon:.0%} of clients leave mid-stream, {os.cpu_count()} cores\n")
    print("| phase | clients | completed | failed | refused (429/503) | abandoned | tok/s | TTFT p50 / p99 s "
          "| latency p50 / p99 s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for phase in phases:
        print(phase.row())
    print(f"\nRSS idle (after a full batch) {idle:.0f} MB; 2 s after each phase: "
          f"{', '.join(f'{m:.0f}' for m in settled)} MB; server alive: {alive}; after the load: "
          f"{health.get('running')} running, {health.get('waiting')} waiting")
    for phase in phases:
        for error, count in phase.errors.items():
            print(f"  {phase.name}: {count} x {error}")


if __name__ == "__main__":
    main()
