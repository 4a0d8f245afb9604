"""Exported graphs kept in memory by content, for a process that compiles the same small model again.

torch.onnx's trace and decompositions take 3-6 s a graph even for a model of kilobytes (cProfile on a
two-layer segment: about 3 s of decompositions and 1.5 s of tracing), and a process that compiles one
model several ways (other precisions, targets or calibration settings: a benchmark, a notebook, the
test suite, where 245 of 328 exports in a run were repeats) exports the same graphs again. The key is
everything an export reads: the module tree's classes and plain attributes, its parameters and
buffers (non-persistent ones too), the example inputs' shapes and types, the input and output names,
the dynamic shapes and the file name (a graph's external data is named after its file). A graph
written from the cache is checked against its module as any other (`eec.compiler.export._verify`),
so a key that missed something would stop the compile, not ship a wrong graph.

Only small modules are kept (`MODULE_LIMIT`): hashing is cheap there and the export's fixed cost
dominates; a real model's segments are exported once each anyway.
"""

from __future__ import annotations

import hashlib
import threading
import types
from collections import OrderedDict
from pathlib import Path

import torch

MODULE_LIMIT = 16 << 20  # bytes of a module's parameters and buffers up to which its export is kept
CACHE_LIMIT = 256 << 20  # bytes of graph files held; the least recently used go first

_PLAIN = (bool, int, float, str, type(None))


class ExportCache:
    """Exported graphs' files by a key of what the export read, least recently used dropped first."""

    def __init__(self, limit: int = CACHE_LIMIT, module_limit: int = MODULE_LIMIT):
        self.limit, self.module_limit = limit, module_limit
        self._files: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def key(self, module: torch.nn.Module, *parts) -> str | None:
        """The key of exporting ``module`` with ``parts`` (example inputs, names, shapes, file name), or
        None where the module is too large to keep."""
        if self.limit <= 0:
            return None
        tensors = [*module.named_parameters(), *module.named_buffers()]
        if sum(t.numel() * t.element_size() for _, t in tensors) > self.module_limit:
            return None
        h = hashlib.blake2b(digest_size=20)
        h.update(repr([_describe(p) for p in parts]).encode())
        for name, sub in module.named_modules():
            h.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}:{_attributes(sub)}".encode())
        for name, t in tensors:
            h.update(f"{name}:{_tensor(t)}".encode())
        return h.hexdigest()

    def write(self, key: str | None, folder: Path) -> bool:
        """Write the graph kept under ``key`` into ``folder``; False where none is kept."""
        if key is None:
            return False
        with self._lock:
            files = self._files.get(key)
            if files is None:
                return False
            self._files.move_to_end(key)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return True

    def keep(self, key: str | None, graph: Path) -> None:
        """Keep ``graph`` and its external data file (``<name>.data``, where written) under ``key``."""
        if key is None:
            return
        files = {p.name: p.read_bytes() for p in (graph, graph.with_name(graph.name + ".data")) if p.exists()}
        size = sum(map(len, files.values()))
        if size > self.limit:
            return
        with self._lock:
            if key in self._files:
                return
            self._files[key] = files
            self._size += size
            while self._size > self.limit:
                _, dropped = self._files.popitem(last=False)
                self._size -= sum(map(len, dropped.values()))

    def clear(self) -> None:
        with self._lock:
            self._files.clear()
            self._size = 0


def _describe(value) -> object:
    """A tensor by its shape and type (an export reads no values), containers element by element."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, (list, tuple)):
        return type(value).__name__, [_describe(v) for v in value]
    if isinstance(value, dict):
        return "dict", sorted((repr(k), _describe(v)) for k, v in value.items())
    return repr(value)  # names, paths, torch.export's Dims (their repr carries name and range)


def _attributes(module: torch.nn.Module) -> list:
    """A module's own non-tensor attributes that can change what it computes: numbers, strings,
    flags, tuples of them, and functions or classes by name."""
    out = []
    for name, value in sorted(vars(module).items()):
        if name.startswith("_"):
            continue  # torch's own bookkeeping (_parameters, _buffers, _modules, hooks)
        if _plain(value):
            out.append((name, repr(value)))
        elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
            out.append((name, f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"))
        elif isinstance(value, torch.Tensor):
            out.append((name, _tensor(value)))
        else:  # an object the export may read (a model config): its type and its own plain values
            out.append((name, type(value).__qualname__, _plain_items(getattr(value, "__dict__", value))))
    return out


def _plain_items(values) -> list:
    if not isinstance(values, dict):
        return []
    return sorted((str(k), repr(v)) for k, v in values.items() if _plain(v))


def _plain(value) -> bool:
    """A number, string, flag or None, or a tuple or list of them."""
    return isinstance(value, _PLAIN) or isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value)


def _tensor(t: torch.Tensor) -> str:
    """A tensor's type, shape and a digest of its bytes."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{t.dtype}:{tuple(t.shape)}:{hashlib.blake2b(data, digest_size=20).hexdigest()}"


EXPORTS = ExportCache()
