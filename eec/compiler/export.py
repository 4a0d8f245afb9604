"""Export segments and exit heads to ONNX with torch.onnx (the dynamo exporter) and check it.

Batch, sequence, past and total lengths are dynamic. The trace uses lengths
of at least 2 (a length-1 trace specialises that dimension); decode with one
token still runs. Every exported graph is run once in onnxruntime against
the PyTorch module, on inputs of another shape, before it is accepted; a
graph this process exported before from the same module comes from memory
(`eec.compiler.export_cache`) and is checked the same way.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from eec.compiler.export_cache import EXPORTS
from eec.compiler.ops import TRANSLATIONS
from eec.compiler.passes import DropUnusedNormOutputs
from eec.compiler.segments import HEAD_INPUTS, HEAD_OUTPUTS, PlannedHead, PlannedSegment, fill_outputs
from eec.errors import CompileError
from eec.runtime.manifest import FILL, VERIFY
from eec.runtime.sessions import open_sessions

OPSET = 20


def segment_inputs(seg: PlannedSegment, batch: int, seq: int, past: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    module = seg.module
    attn = module.layers[0].attn
    if seg.spec.takes_ids:
        x = torch.randint(0, module.embed.num_embeddings, (batch, seq), generator=g)
    else:
        x = torch.randn(batch, seq, attn.hidden_size, generator=g)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    kv = [torch.randn(batch, attn.n_kv_heads, past, attn.head_dim, generator=g) for _ in range(2 * len(module.layers))]
    return (x, positions, mask, *kv)


def head_inputs(head: PlannedHead, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq, head.module.head.proj.in_features, generator=g),)


def _segment_shapes(n_kv: int):
    batch, seq, past, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    # `total` is its own Dim: torch.export cannot declare past + seq.
    return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past} for _ in range(n_kv)))


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and registry warnings; eec shows its own progress."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_REGISTRIES: dict = {}  # from_torchlib's arguments (the opset) -> its registry, built once a process


@contextlib.contextmanager
def _registry_built_once():
    """torch.onnx builds its registry of ATen-to-ONNX translations on every export: 0.8 s of a tiny
    segment's 2.8 s export (cProfile), and an artifact exports 5-15 graphs. Within eec's exports it is
    built once per opset and each export gets a copy (the custom translations go into the copy).
    The registry is torch's private API: where it is not what this expects, nothing is cached."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:
        yield
        return
    original = ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod) or not hasattr(ONNXRegistry(), "functions"):
        yield
        return
    build = original.__func__

    def cached(cls, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        base = _REGISTRIES.get(key)
        if base is None:
            base = _REGISTRIES[key] = build(cls, *args, **kwargs)
        registry = cls()
        registry.__dict__.update(base.__dict__)
        registry.functions = {target: list(metas) for target, metas in base.functions.items()}
        return registry

    ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = original


def export_segment(seg: PlannedSegment, root: Path) -> None:
    _export_over_segment(seg, seg.module, seg.spec.outputs, root / seg.spec.file,
                         f"layers {seg.spec.start}-{seg.spec.stop}")


def export_fill(seg: PlannedSegment, root: Path) -> None:
    """The segment's `KVFill` graph, beside it (``seg.spec.graph(FILL)``)."""
    _export_over_segment(seg, seg.fill, fill_outputs(seg.spec), root / seg.spec.graph(FILL),
                         f"the key/value fill of layers {seg.spec.start}-{seg.spec.stop}")


def export_verify(seg: PlannedSegment, root: Path) -> None:
    """The last segment's verify graph, beside it (``seg.spec.graph(VERIFY)``): its inputs and outputs, the
    token at every position."""
    outputs = ["token"] + [o for o in seg.spec.outputs if o.startswith("present_")]
    _export_over_segment(seg, seg.verify, outputs, root / seg.spec.graph(VERIFY),
                         f"the verify graph of layers {seg.spec.start}-{seg.spec.stop}")


def _export_over_segment(seg: PlannedSegment, module, outputs: list[str], path: Path, what: str) -> None:
    """Export ``module`` (the segment or a graph over its inputs and KV), then check it on other shapes."""
    args = segment_inputs(seg, batch=2, seq=3, past=4)
    shapes = _segment_shapes(2 * len(seg.module.layers))
    _export(module, args, seg.spec.inputs, outputs, shapes, path, what)
    _verify(module, segment_inputs(seg, batch=1, seq=2, past=5, seed=1), seg.spec.inputs, outputs, path, what)


def export_head(head: PlannedHead, root: Path) -> None:
    shapes = ({0: Dim("batch"), 1: Dim("seq")},)
    what = f"exit head {head.file}"
    _export(head.module, head_inputs(head, 2, 3), HEAD_INPUTS, HEAD_OUTPUTS, shapes, root / head.file, what)
    _verify(head.module, head_inputs(head, 1, 2, seed=1), HEAD_INPUTS, HEAD_OUTPUTS, root / head.file, what)


def _export(module, args, inputs, outputs, shapes, path: Path, what: str) -> None:
    key = EXPORTS.key(module, args, inputs, outputs, shapes, path.name, OPSET)
    if EXPORTS.write(key, path.parent):
        return
    try:
        with _quiet(), torch.no_grad(), _registry_built_once():
            program = torch.onnx.export(
                module, args, input_names=inputs, output_names=outputs, dynamic_shapes=shapes,
                opset_version=OPSET, dynamo=True, verbose=False, custom_translation_table=TRANSLATIONS,
            )
            DropUnusedNormOutputs()(program.model)  # before saving: the saved graph is the one verified
            path.parent.mkdir(parents=True, exist_ok=True)
            program.save(str(path), external_data=True)
    except Exception as e:
        raise CompileError(f"exporting {what} to ONNX failed: {type(e).__name__}: {str(e)[:300]}") from e
    EXPORTS.keep(key, path)


def _verify(module, args, inputs, outputs, path: Path, what: str, rtol: float = 1e-4) -> None:
    """Run the ONNX graph and the module on shapes other than the trace's."""
    with torch.no_grad():
        expected = module(*args)
    session = open_sessions(path.parent, [path.name])[0]
    got = session.run(outputs, {n: a.numpy() for n, a in zip(inputs, args)})
    for name, g, e in zip(outputs, got, expected):
        if name in ("token", "top_ids"):
            continue  # near-ties may legitimately swap; the scores and logits are compared instead
        e = e.numpy()
        err = float(np.max(np.abs(g - e)) / (1.0 + np.max(np.abs(e)))) if e.size else 0.0
        if not err <= rtol:
            raise CompileError(f"ONNX graph of {what} disagrees with PyTorch on {name} (relative error {err:.2e})")
