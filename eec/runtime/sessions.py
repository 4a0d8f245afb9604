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
from typing import TYPE_CHECKING

import onnxruntime as ort

if TYPE_CHECKING:
    from eec.runtime.manifest import Manifest

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


def open_sessions(root: Path, files: list[str], threads: int | None = None,
                  manifest: "Manifest | None" = None) -> list[ort.InferenceSession]:
    """Sessions on onnxruntime's CPU provider, or on TensorRT with the engines `eec build-engines`
    cached in the artifact when the manifest records them and this onnxruntime has TensorRT."""
    options = session_options(threads)
    use_trt = manifest is not None and manifest.engines and TRT in ort.get_available_providers()
    sessions = []
    for f in files:
        providers: list = ["CPUExecutionProvider"]
        if use_trt:
            inputs = next((spec.inputs for spec in manifest.segments if f in (spec.file, spec.fill, spec.with_head)), ["hidden"])
            providers = [(TRT, trt_provider_options(root, manifest, inputs)), "CUDAExecutionProvider", *providers]
        sessions.append(ort.InferenceSession(str(root / f), options, providers=providers))
    return sessions


TRT = "TensorrtExecutionProvider"
ENGINE_DIR = "engines"
MAX_CALL_TOKENS = 8  # one new token plus up to seven pending catch-up positions


def input_dims(manifest: "Manifest", name: str, seq: int, past: int) -> str:
    m = manifest.model
    if name in ("input_ids", "position_ids"):
        return f"1x{seq}"
    if name == "attention_mask":
        return f"1x{past + seq}"
    if name == "hidden":
        return f"1x{seq}x{m.hidden_size}"
    return f"1x{m.num_kv_heads}x{past}x{m.head_dim}"  # past_key_i / past_value_i


def trt_provider_options(root: Path, manifest: "Manifest", inputs: list[str]) -> dict[str, str]:
    """TensorRT provider options for one graph: the engine cache in the artifact and optimization
    profiles for 1..8 new tokens up to the context. Building and running must use the same ones.
    NOT VERIFIED on a machine with TensorRT (docs/targets.md)."""
    context = manifest.model.context_length
    longest = MAX_CALL_TOKENS

    def shapes(seq: int, past: int) -> str:
        return ",".join(f"{n}:{input_dims(manifest, n, seq, past)}" for n in inputs)

    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(root / ENGINE_DIR),
        "trt_timing_cache_enable": "True",
        # int8 artifacts are explicit Q/DQ graphs; their unquantized layers may run in fp16.
        "trt_fp16_enable": "True" if manifest.precision in ("fp16", "int8") else "False",
        "trt_int8_enable": "True" if manifest.precision == "int8" else "False",
        "trt_profile_min_shapes": shapes(1, 0),
        "trt_profile_opt_shapes": shapes(1, min(256, context - 1)),
        "trt_profile_max_shapes": shapes(longest, context - longest),
    }
