"""onnxruntime sessions for an artifact's graphs.

Segments run one after another, never at once, so every session in the
process shares onnxruntime's global thread pool. Per-session pools spin
after each run and steal the cores the next segment needs: on SmolLM2 with
4 segments on 2 cores, decode ran at 18 tok/s with per-session pools,
50 tok/s with their spinning turned off and 56 tok/s with the global pool.

onnxruntime allows one global pool per process, fixed at its first use; once
it exists, every session must use it. So the thread count is process-wide:
the first `session_options` call sets it and later ones share it.

Every session also takes its CPU memory from one arena registered with the
process's onnxruntime environment, not an arena of its own. A chain of
segments then reuses the buffers the previous segment just wrote and read,
still in cache, as one whole graph does layer after layer; with an arena per
session each segment walks its own cold buffers. Measured on a 6-layer BERT
(hidden 128, 128 tokens, 2 cores), six segment sessions one after another
against the same layers in one graph: 1.15x slower at batch 32 and 1.18x at
batch 8 with an arena each, 1.03x and 1.06x sharing one.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import onnxruntime as ort

from eec.errors import ArtifactError, InputError
from eec.runtime.manifest import PLAIN, ROLES

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
        cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, -1, -1, -1))  # onnxruntime's defaults
        except Exception:  # noqa: BLE001 - the host application registered one already: share that
            pass
        _pool_threads = threads
    elif threads != _pool_threads:
        warnings.warn(
            f"onnxruntime's thread pool already has {_pool_threads} threads in this process; {threads} ignored",
            stacklevel=3,
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.use_per_session_threads = False
    options.add_session_config_entry("session.use_env_allocators", "1")
    return options


# y = Identity(x), x and y float [1], opset 17, IR 8: onnx.helper's bytes, kept here because the
# runtime does not depend on onnx.
_IDENTITY_MODEL = bytes.fromhex(
    "080812003a3b0a100a017812017922084964656e74697479120570726f62655a0f0a0178120a0a08080112040a020801"
    "620f0a0179120a0a08080112040a02080142040a001011")


@functools.cache
def tensorrt_available() -> bool:
    """Whether onnxruntime can run its TensorRT provider here. onnxruntime-gpu lists the provider
    whether or not TensorRT's libraries are installed (seen on an H100 without them), and a session
    asked for it then falls back to CUDA with a printed error: so a one-node session must really
    open on it."""
    if TRT not in ort.get_available_providers():
        return False
    try:
        session = ort.InferenceSession(_IDENTITY_MODEL, session_options(), providers=[TRT])
    except Exception:  # noqa: BLE001 - any failure to open means no usable TensorRT
        return False
    return session.get_providers()[0] == TRT


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """A notice on stderr, once per process: it concerns the machine, not each load."""
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr, flush=True)


def pick_device(device: str, manifest: "Manifest") -> str:
    """Where an artifact's sessions run: "cpu", "cuda" (onnxruntime's CUDA provider) or "tensorrt"
    (the engines `eec build-engines` cached in the artifact). ``device="auto"`` takes TensorRT where
    the engines are built and this onnxruntime has it, else CUDA for an fp16 artifact where this
    onnxruntime has it (its GroupQueryAttention runs in half precision only), else the CPU; a
    TensorRT target's artifact run without TensorRT says so on stderr, once."""
    available = ort.get_available_providers()
    if device == "auto":
        if manifest.engines and tensorrt_available():
            return "tensorrt"
        picked = "cuda" if manifest.precision == "fp16" and CUDA in available else "cpu"
        from eec.targets.profiles import TARGETS  # the registry: torch-free

        if getattr(TARGETS.get(manifest.target), "builds_engines", False):
            _say_once(f"eec: {manifest.target} artifact running on {picked} through onnxruntime, not TensorRT: "
                      + ("its engines are not built here (`eec build-engines ARTIFACT`)" if tensorrt_available()
                         else "this onnxruntime has no usable TensorRT provider") + "; expect it to be much slower")
        return picked
    if device not in DEVICES:
        raise InputError(f"device must be one of auto, {', '.join(DEVICES)}; got {device!r}")
    if device == "cuda" and CUDA not in available:
        raise InputError("device 'cuda' needs onnxruntime with its CUDA provider (pip install onnxruntime-gpu "
                         f"in place of onnxruntime); this one has {', '.join(available)}")
    if device == "cuda" and manifest.precision != "fp16":
        raise InputError(f"device 'cuda' runs fp16 artifacts (onnxruntime's GroupQueryAttention has no "
                         f"{manifest.precision} kernel on CUDA); compile with --precision fp16")
    if device == "tensorrt" and not (manifest.engines and tensorrt_available()):
        raise InputError("device 'tensorrt' needs engines built on this machine (`eec build-engines ARTIFACT`) "
                         "and onnxruntime with its TensorRT provider")
    return device


def open_graphs(root: Path, manifest: "Manifest", roles: "Sequence[str]", threads: int | None = None,
                device: str = "cpu", opened: dict | None = None) -> list[dict[str, ort.InferenceSession]]:
    """Each segment's sessions for ``roles`` (`eec.runtime.manifest.ROLES`) where it has those graphs,
    the plain graph always: the one way runtime, measurement and engine builds open an artifact.
    ``opened``: sessions by file, reused and added to (a graph opened twice holds its weights twice)."""
    opened = {} if opened is None else opened
    graphs = []
    for spec in manifest.segments:
        files = {role: spec.graph(role) for role in dict.fromkeys((PLAIN, *roles)) if spec.graph(role)}
        for file in files.values():
            if file not in opened:
                opened[file] = open_sessions(root, [file], threads, manifest, device)[0]
        graphs.append({role: opened[file] for role, file in files.items()})
    return graphs


def open_sessions(root: Path, files: list[str], threads: int | None = None,
                  manifest: "Manifest | None" = None, device: str = "cpu") -> list[ort.InferenceSession]:
    """Sessions on onnxruntime's CPU provider, its CUDA provider (``device="cuda"``), or TensorRT
    (``device="tensorrt"``) with the engines cached in the artifact; ``device`` as `pick_device` says."""
    options = session_options(threads)
    sessions = []
    for f in files:
        providers: list = ["CPUExecutionProvider"]
        if device == "cuda":
            providers = [CUDA, *providers]
        elif device == "tensorrt":
            # Every graph of a segment takes the segment's inputs, so each gets the same profiles.
            inputs = next((spec.inputs for spec in manifest.segments if f in [spec.graph(r) for r in ROLES]), ["hidden"])
            providers = [(TRT, trt_provider_options(root, manifest, inputs)), CUDA, *providers]
        try:
            sessions.append(ort.InferenceSession(str(root / f), options, providers=providers))
        except Exception as e:  # noqa: BLE001 - a graph onnxruntime cannot open is a broken artifact
            detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"onnxruntime cannot open {root / f}: {detail}") from None
    return sessions


TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("cpu", "cuda", "tensorrt")
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
