"""Store every weight of an artifact once: all graphs' initializers in one file, by content.

An artifact's graphs repeat each other's weights: a segment's graph with its
exit head inside holds the segment and the head again, the verify graph holds
the last segment again, the model's own LM head sits in the last segment and
in the shared exit head, and a tied embedding and LM head are exported as two
matrices (one the transpose of the other). SmolLM2 compiled for a Jetson with
fused heads took 700 MB for 135M parameters; stored once it is the size of its
distinct weights (docs/benchmarks.md, "Artifact sizes").

Rules:
1. Every graph lies in one folder, and its initializers of at least `INLINE`
   bytes are written to one file there, `WEIGHTS`, each distinct tensor
   (dtype, shape and bytes) once; each graph refers to it by offset.
   Onnxruntime reads external data only from its graph's folder or below,
   so the graphs share a folder.
2. A floating-point matrix of at least `TIE_FROM` bytes whose transpose is already stored is not
   stored again: the graph reads the stored one through a Transpose node,
   which onnxruntime folds when the session opens (a tied embedding and LM
   head in fp32 and fp16; quantized heads are no transpose of the
   embedding, so int4 and int8 keep both).
3. Tensors of at least `ALIGN_FROM` bytes start at multiples of `ALIGN`, so
   a runtime may map them from the file.
4. Graphs are rewritten one at a time through a staging name and each graph's
   former weights file is removed only once every graph refers to the shared
   one; the folder is a staging directory, so a failure leaves no artifact.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

WEIGHTS = "weights.data"
INLINE = 1024  # bytes: smaller initializers (norm scales, shapes) stay inside their graph
ALIGN_FROM, ALIGN = 1 << 20, 1 << 16
TIE_FROM = 1 << 16  # bytes: matrices from this size are looked up by their transpose too
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class _Stored:
    offset: int
    length: int
    dtype: ir.DataType
    shape: tuple[int, ...]


@dataclass
class StoreReport:
    """What `store_once` wrote: ``written`` bytes in `WEIGHTS`, of ``referenced`` bytes the graphs use."""

    written: int = 0
    referenced: int = 0
    tied: list[str] = field(default_factory=list)  # graph: initializer read as the transpose of a stored one


def _key(dtype: ir.DataType, shape: tuple[int, ...], data: bytes) -> str:
    digest = hashlib.sha256(f"{dtype.name}{shape}".encode())
    digest.update(data)
    return digest.hexdigest()


def store_once(folder: Path, graphs: list[str]) -> StoreReport:
    """Rewrite the graphs ``graphs`` (names inside ``folder``, each with its weights in
    ``<name>.data`` beside it or inline) to share ``folder / WEIGHTS`` (rules 1-4)."""
    folder = Path(folder)
    stored: dict[str, _Stored] = {}
    transposed: dict[str, _Stored] = {}  # the key a matrix's transpose would have -> the stored matrix
    report = StoreReport()
    staged = []
    with open(folder / WEIGHTS, "wb") as out:
        for name in graphs:
            model = ir.external_data.load_to_model(ir.load(folder / name))

            def store(tensor: ir.TensorProtocol) -> _Stored:
                data = tensor.tobytes()
                key = _key(tensor.dtype, tuple(tensor.shape), data)
                if key in stored:
                    return stored[key]
                if len(data) >= ALIGN_FROM and out.tell() % ALIGN:
                    out.write(b"\0" * (ALIGN - out.tell() % ALIGN))
                entry = stored[key] = _Stored(out.tell(), len(data), tensor.dtype, tuple(tensor.shape))
                out.write(data)
                report.written += len(data)
                if tensor.dtype in FLOATS and len(tensor.shape) == 2 and len(data) >= TIE_FROM:
                    flipped = np.ascontiguousarray(tensor.numpy().T)
                    transposed.setdefault(_key(tensor.dtype, flipped.shape, flipped.tobytes()), entry)
                return entry

            def external(entry: _Stored, tensor_name: str) -> ir.ExternalTensor:
                return ir.ExternalTensor(WEIGHTS, entry.offset, entry.length, entry.dtype,
                                         shape=ir.Shape(entry.shape), name=tensor_name, base_dir=folder)

            for value in list(model.graph.initializers.values()):
                tensor = value.const_value
                if tensor is None or tensor.nbytes < INLINE:
                    continue
                report.referenced += tensor.nbytes
                key = _key(tensor.dtype, tuple(tensor.shape), tensor.tobytes())
                if key not in stored and key in transposed and not (value.is_graph_input() or value.is_graph_output()):
                    _read_transposed(model.graph, value, external(transposed[key], f"{value.name}/T"))
                    report.tied.append(f"{name}: {value.name}")
                    continue
                value.const_value = external(store(tensor), value.name)
            temp = folder / f".{Path(name).name}.staged"
            ir.save(model, temp)
            staged.append((temp, folder / name))
    for temp, final in staged:
        os.replace(temp, final)
        (final.parent / f"{final.name}.data").unlink(missing_ok=True)
    return report


def _read_transposed(graph: ir.Graph, value: ir.Value, stored: ir.ExternalTensor) -> None:
    """Replace the initializer ``value`` by ``Transpose(stored)`` (rule 2)."""
    source = ir.Value(name=stored.name, shape=stored.shape, type=ir.TensorType(stored.dtype), const_value=stored)
    graph.register_initializer(source)
    node = ir.node("Transpose", [source], attributes={"perm": [1, 0]}, name=f"{value.name}/transpose")
    result = node.outputs[0]
    result.shape, result.type = value.shape, value.type
    ir.convenience.replace_all_uses_with(value, result)
    graph.initializers.pop(value.name)
    graph.insert_before(graph.node(0), node) if len(graph) else graph.append(node)
    result.name = value.name


def store_weights_once(root: Path, segments) -> StoreReport:
    """A classifier artifact's graphs (all in one folder under ``root``) sharing one weights file: an exit
    segment's graph with its head holds the segment again, every exit reusing the model's classifier holds
    it again, and ALBERT's layers are one layer's weights."""
    from pathlib import PurePosixPath

    from eec.runtime.manifest import PLAIN

    # plain graphs first: the first copy of a weight, which the others then read, is the one full mode reads
    files = [seg.graphs[PLAIN] for seg in segments]
    files += [f for seg in segments for role, f in seg.graphs.items() if role != PLAIN]
    folders = {PurePosixPath(f).parent for f in files}
    assert len(folders) == 1, folders  # rule 1: one folder
    return store_once(Path(root) / str(folders.pop()), [PurePosixPath(f).name for f in files])

