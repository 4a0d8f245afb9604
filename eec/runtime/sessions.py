"""onnxruntime sessions for an artifact's graphs.

Segments run one after another, never at once, so every session in the
process shares onnxruntime's global thread pool. Per-session pools spin
after each run and steal the cores the next segment needs: on SmolLM2 with
4 segments on 2 cores, decode ran at 18 tok/s with per-session pools,
50 tok/s with their spinning turned off and 56 tok/s with the global pool.

onnxruntime allows one global pool per process, fixed at its first use; once
it exists, every session must use it. So the thread count is process-wide:
the first `session_options` call sets it and later ones share it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnxruntime as ort

_pool_threads: int | None = None


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    global _pool_threads
    threads = threads or default_threads()
    if _pool_threads is None:
        ort.set_global_thread_pool_sizes(threads, 1)
        _pool_threads = threads
    elif threads != _pool_threads:
        warnings.warn(
            f"onnxruntime's thread pool already has {_pool_threads} threads in this process; {threads} ignored",
            stacklevel=3,
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.use_per_session_threads = False
    return options


def open_sessions(root: Path, files: list[str], threads: int | None = None) -> list[ort.InferenceSession]:
    options = session_options(threads)
    return [ort.InferenceSession(str(root / f), options, providers=["CPUExecutionProvider"]) for f in files]
