"""`eec build-engines`: TensorRT engines for a TensorRT-target artifact, built on the device itself.

An engine belongs to one GPU model and one TensorRT version, so the compiler
writes portable ONNX and this step runs where the artifact will run. It goes
through onnxruntime's TensorRT execution provider with its engine cache in
``ARTIFACT/engines/``: each graph is opened once with optimization profiles
covering 1..8 new tokens (decode plus catch-up) and up to the model's
context, then run once, which builds and caches the engine. The runtime
opens the same graphs with the same provider options and finds the cache.

NOT VERIFIED: no machine this was written on had onnxruntime-gpu with
TensorRT; the tests that exercise it skip with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from eec.errors import InputError
from eec.runtime.manifest import Manifest, hash_files, read_manifest, write_manifest
from eec.runtime.sessions import ENGINE_DIR, TRT, input_dims, tensorrt_available, trt_provider_options
from eec.targets.profiles import get_target



def build_engines(artifact: Path, progress: Callable[[str, int, int], None] = lambda *a: None) -> Manifest:
    root = Path(artifact)
    manifest = read_manifest(root)
    target = get_target(manifest.target)
    if not target.builds_engines:
        raise InputError(f"{root} is compiled for {target.name} ({target.backend}), which has no engines to build")
    if not tensorrt_available():
        raise InputError("TensorRT is not available here: build engines on the target device, with onnxruntime-gpu "
                         "built with TensorRT (JetPack's onnxruntime-gpu on Jetson)")
    graphs = [(f, s.inputs) for s in manifest.segments for f in s.graphs.values()]
    graphs += [(f, ["hidden"]) for f in dict.fromkeys(s.exit.file for s in manifest.segments if s.exit and s.exit.file)]
    (root / ENGINE_DIR).mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (file, inputs) in enumerate(graphs):
        progress(f"building {file}", i, len(graphs))
        options = trt_provider_options(root, manifest, inputs)
        session = ort.InferenceSession(str(root / file), providers=[(TRT, options), "CUDAExecutionProvider"])
        feeds = {}
        for name in inputs:
            shape = [int(d) for d in input_dims(manifest, name, 1, 4).split("x")]
            feeds[name] = (np.ones(shape, dtype=np.int64) if name in ("input_ids", "attention_mask") else
                           np.arange(4, 5, dtype=np.int64)[None, :] if name == "position_ids" else
                           rng.standard_normal(shape).astype(np.float32))
        session.run(None, feeds)  # the first run builds the engine into the cache
    progress("done", len(graphs), len(graphs))
    device = ort.get_device()
    manifest = replace(manifest, files=hash_files(root),
                       engines={"dir": ENGINE_DIR, "onnxruntime": ort.__version__, "device": device})
    write_manifest(root, manifest)
    return manifest
