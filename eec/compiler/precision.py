"""Bring exported fp32 graphs to the artifact's precision with the passes in `eec.compiler.passes`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from eec.compiler.passes import Float16, FuseExitHead, Int8Dynamic, Int8StaticQDQ, Q4CarryOver, WeightOnly

PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic", "int4", "int4-gguf")
DEFAULT_BLOCK_SIZE = 32


def needs_feeds(precision: str, backend: str) -> bool:
    """Static int8 (TensorRT's int8) calibrates activation scales on recorded graph inputs."""
    return precision == "int8" and backend == "tensorrt"


def precision_passes(precision: str, block_size: int = DEFAULT_BLOCK_SIZE, backend: str = "onnxruntime-cpu",
                     feeds: list[dict] | None = None) -> list:
    if needs_feeds(precision, backend):
        return [Int8StaticQDQ(feeds or [])]
    return {
        "fp32": [],
        "fp16": [Float16()],
        # Weight-only int8 keeps more of fp32's agreement than dynamic int8 on SmolLM2 (docs/targets.md).
        "int8": [WeightOnly(8, block_size)],
        "int8-dynamic": [Int8Dynamic()],
        "int4": [WeightOnly(4, block_size)],
        # A 4-bit GGUF's Q4_1 blocks carried over exactly rather than re-quantized (docs/targets.md):
        # SmolLM2's agreement with fp32 0.65 -> 0.82, decode about a quarter slower on CPU.
        "int4-gguf": [Q4CarryOver(block_size), WeightOnly(4, block_size)],
    }[precision]


def apply_precision(path: Path, precision: str, block_size: int = DEFAULT_BLOCK_SIZE,
                    backend: str = "onnxruntime-cpu", feeds: list[dict] | None = None) -> bool:
    """Rewrite the graph at ``path`` (weights in ``<name>.data`` beside it) in place; True if it changed."""
    passes = precision_passes(precision, block_size, backend, feeds)
    if not passes:
        return False
    model = ir.external_data.load_to_model(ir.load(path))  # into memory: the file is replaced below
    modified = False
    for p in passes:
        result = p(model)
        model, modified = result.model, modified or result.modified
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        ir.save(model, staged, external_data=f"{path.name}.data")
        del model  # drop references into the old weights file before replacing it
        for f in (path, path.with_name(f"{path.name}.data")):
            f.unlink(missing_ok=True)
            if (Path(tmp) / f.name).exists():
                shutil.move(Path(tmp) / f.name, f)
    return modified


def record_feeds(root: Path, prompts: list, max_new_tokens: int = 12, limit: int = 48) -> dict[str, list[dict]]:
    """Inputs each graph of the fp32 artifact at ``root`` sees while decoding ``prompts``, every exit
    head included (thresholds that never pass), at most ``limit`` per graph. Concat KV only (the
    TensorRT targets', the only ones calibrated on feeds): shared-KV segments run through IO
    bindings, whose inputs a stand-in session cannot see."""
    import math

    import numpy as np

    from eec.runtime import load

    model = load(root, verify=False)
    if any(s.kv_cache == "shared" for s in model.manifest.segments):
        raise ValueError(f"{root}: feeds are recorded from concat-KV artifacts only")
    recorded: dict[str, list[dict]] = {}

    class Recorder:
        def __init__(self, file: str, session):
            self.file, self.session = file, session

        def get_inputs(self):
            return self.session.get_inputs()

        def get_outputs(self):
            return self.session.get_outputs()

        def run(self, names, feeds):
            kept = recorded.setdefault(self.file, [])
            if len(kept) < limit:
                kept.append({k: np.array(v) for k, v in feeds.items()})
            return self.session.run(names, feeds)

    model.opened = {f: Recorder(f, sess) for f, sess in model.opened.items()}
    for prompt in prompts:
        model.generate(prompt, max_new_tokens=max_new_tokens, thresholds=math.inf)
    return recorded


def write_with_head(segment: Path, head: Path, out: Path) -> None:
    """Write ``out``: the graph at ``segment`` with the exit head at ``head`` inside (`FuseExitHead`),
    both already at the artifact's precision, so the fused graph computes what the two do."""
    model = ir.load(segment)
    result = FuseExitHead(ir.load(head))(model)
    if not result.modified:
        raise ValueError(f"{segment.name} and {head.name} cannot be fused (no hidden_out, or not an exit head)")
    ir.save(result.model, out, external_data=f"{out.name}.data")
