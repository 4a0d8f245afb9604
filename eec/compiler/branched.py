"""A user's branched network (a backbone of stages with exit heads) as a file ``eec compile`` reads.

The contract (docs/format.md, "A branched network"): a module with
``stages: nn.ModuleList``, run in order, each taking one tensor and returning
one, and ``exits: nn.ModuleDict`` of heads keyed by the index (as text) of the
stage each follows, each returning class logits ``[batch, classes]``; the head
after the last stage is the final classifier.

`save_early_exit`, called in the user's training code, exports every stage
and every head to its own ONNX graph with a dynamic batch, checks each graph
against PyTorch, and writes them with a JSON spec into one zip file. Nothing
in it is a pickle, so `eec compile` on another machine needs neither the
user's code nor an unpickler: `read_branched` reads the spec, checks every
graph's sha256 and ONNX validity, and hands the compiler ``onnx`` models.

Why per-stage graphs and not one graph per segment: the exits a deployment
keeps are chosen at compile time (by measured latency with ``--exits auto``),
after training; stage graphs chain into any grouping without the user's code.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from eec.errors import CompileError, InputError

FORMAT = "eec-early-exit"
VERSION = 1
SPEC = "eec-early-exit.json"
EXAMPLE = "example.npy"  # a few samples of the example input: the compiler checks its graphs on real inputs
EXAMPLE_SAMPLES = 8
STAGE_IN, STAGE_OUT = "x", "y"  # every stage graph's input and output
HEAD_IN, HEAD_OUT = "h", "logits"  # every head graph's input and output
INPUT_DTYPES = ("float32",)
MAX_MEMBER_BYTES = 4 << 30  # a graph larger than this would not load as one ONNX protobuf anyway (2 GiB limit)
OPSET = 20


@dataclass
class BranchedNetwork:
    """What `read_branched` hands the compiler: the spec and every graph, checked."""

    input_shape: list[int]  # one sample's shape, without the batch
    input_dtype: str
    num_classes: int
    stages: list  # onnx.ModelProto per stage, in order (x -> y)
    exits: dict[int, object]  # stage index -> onnx.ModelProto of the head after it (h -> logits)
    example: np.ndarray  # [samples, *input_shape]: real inputs from the user's example batch
    class_names: list[str] | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def final(self) -> int:
        return len(self.stages) - 1


def is_branched_file(path: str | Path) -> bool:
    """Whether ``path`` is a file `save_early_exit` wrote (a zip holding the spec), without reading graphs."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return SPEC in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


# --- writing (torch side) ----------------------------------------------------------------------------------


def save_early_exit(model, example_input, path: str | Path, *, class_names: list[str] | None = None,
                    metadata: dict | None = None, rtol: float = 1e-4) -> Path:
    """Write ``model`` (the contract above) to ``path`` for ``eec compile``.

    ``example_input`` is one batch of real inputs (any batch size; the graphs
    take any). The model is exported in eval mode and put back in the mode it
    was in. Raises `InputError` for a model outside the contract.
    """
    import torch

    stages, heads = _contract(model)
    x = _example(example_input)
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory; give a file name such as model.pt")
    if not path.parent.is_dir():
        raise InputError(f"folder {path.parent} does not exist")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = [x]  # each stage's input, from the example
            for stage in stages:
                inputs.append(_one_tensor(stage(inputs[-1]), "a stage"))
            num_classes = None
            for k, head in heads.items():
                logits = _one_tensor(head(inputs[k + 1]), f"exit head {k}")
                if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                    raise InputError(f"exit head {k} returns shape {list(logits.shape)}; heads return logits "
                                     "[batch, classes]")
                if num_classes not in (None, logits.shape[1]):
                    raise InputError(f"exit head {k} has {logits.shape[1]} classes, others {num_classes}")
                num_classes = logits.shape[1]
        if class_names is not None and (len(class_names) != num_classes
                                        or not all(isinstance(c, str) for c in class_names)):
            raise InputError(f"class_names must be {num_classes} names, one per class")
        members: dict[str, bytes] = {}
        spec_stages, spec_exits = [], []
        for i, stage in enumerate(stages):
            name = f"stages/{i}.onnx"
            members[name] = _export(stage, inputs[i], STAGE_IN, STAGE_OUT, f"stage {i}", rtol)
            spec_stages.append({"file": name, "sha256": _sha(members[name]),
                                "output_shape": list(inputs[i + 1].shape[1:])})
        for k, head in heads.items():
            name = f"exits/{k}.onnx"
            members[name] = _export(head, inputs[k + 1], HEAD_IN, HEAD_OUT, f"exit head {k}", rtol)
            spec_exits.append({"stage": k, "file": name, "sha256": _sha(members[name])})
    finally:
        model.train(was_training)
    from eec import __version__

    buffer = io.BytesIO()
    np.save(buffer, example_input.detach().cpu().numpy()[:EXAMPLE_SAMPLES], allow_pickle=False)
    members[EXAMPLE] = buffer.getvalue()
    spec = {
        "format": FORMAT, "version": VERSION,
        "input": {"shape": list(x.shape[1:]), "dtype": str(x.dtype).removeprefix("torch.")},
        "num_classes": int(num_classes), "class_names": class_names,
        "stages": spec_stages, "exits": spec_exits, "example": {"file": EXAMPLE, "sha256": _sha(members[EXAMPLE])},
        "metadata": {"module": type(model).__name__, "torch": torch.__version__, "eec": __version__,
                     **(metadata or {})},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(SPEC, json.dumps(spec, indent=2) + "\n")
            for name, data in members.items():
                z.writestr(name, data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _contract(model):
    from torch import nn

    if not isinstance(model, nn.Module):
        raise InputError(f"save_early_exit takes an nn.Module, got {type(model).__name__}")
    stages, exits = getattr(model, "stages", None), getattr(model, "exits", None)
    if not isinstance(stages, nn.ModuleList) or not isinstance(exits, nn.ModuleDict):
        raise InputError(f"{type(model).__name__} needs `stages: nn.ModuleList` and `exits: nn.ModuleDict` (keyed by "
                         "the index of the stage each head follows); see docs/format.md")
    if len(stages) == 0:
        raise InputError(f"{type(model).__name__}.stages is empty")
    heads = {}
    for key, head in exits.items():
        if not (key.isdigit() and int(key) < len(stages)) or str(int(key)) != key:
            raise InputError(f"exits key {key!r} names no stage; keys are stage indices 0..{len(stages) - 1} as text")
        heads[int(key)] = head
    if len(stages) - 1 not in heads:
        raise InputError(f"no head after the last stage (exits[{str(len(stages) - 1)!r}]): it is the final classifier")
    return list(stages), dict(sorted(heads.items()))


def _example(example_input):
    import torch

    if not isinstance(example_input, torch.Tensor):
        raise InputError(f"example_input must be a torch tensor (one batch of inputs), got {type(example_input).__name__}")
    if str(example_input.dtype).removeprefix("torch.") not in INPUT_DTYPES:
        raise InputError(f"example_input has dtype {example_input.dtype}; eec takes {', '.join(INPUT_DTYPES)} inputs")
    if example_input.ndim < 2 or example_input.shape[0] < 1:
        raise InputError(f"example_input must be a batch [batch, ...], got shape {list(example_input.shape)}")
    if not torch.isfinite(example_input).all():
        raise InputError("example_input holds NaN or infinite values")
    x = example_input.detach().cpu()
    # torch.export specialises a dimension traced at size 1: trace with at least 2 samples.
    return x if x.shape[0] >= 2 else x.expand(2, *x.shape[1:]).contiguous()


def _one_tensor(value, what: str):
    import torch

    if not isinstance(value, torch.Tensor):
        raise InputError(f"{what} returned {type(value).__name__}; each stage and head returns one tensor")
    return value


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _export(module, x, input_name: str, output_name: str, what: str, rtol: float) -> bytes:
    """One module to ONNX bytes with a dynamic batch, checked against PyTorch on another batch size."""
    import torch
    from torch.export import Dim

    from eec.compiler.export import _quiet, _registry_built_once

    try:
        with _quiet(), torch.no_grad(), _registry_built_once():
            program = torch.onnx.export(module, (x,), input_names=[input_name], output_names=[output_name],
                                        dynamic_shapes=({0: Dim("batch")},), opset_version=OPSET, dynamo=True,
                                        verbose=False)
            program.optimize()
            data = program.model_proto.SerializeToString()
    except Exception as e:
        raise CompileError(f"exporting {what} to ONNX failed: {type(e).__name__}: {str(e)[:300]}") from e
    import onnxruntime as ort

    from eec.runtime.sessions import session_options

    check = torch.cat([x, x[:1]])  # another batch size than the trace's
    with torch.no_grad():
        expected = module(check).numpy()
    got = ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"]).run(
        None, {input_name: check.numpy()})[0]
    err = float(np.max(np.abs(got - expected)) / (1.0 + np.max(np.abs(expected)))) if expected.size else 0.0
    if got.shape != expected.shape or not err <= rtol:
        raise CompileError(f"the ONNX graph of {what} disagrees with PyTorch (relative error {err:.2e}); "
                           "does it depend on the batch, or hold an operation torch.onnx does not translate exactly?")
    return data


# --- reading (compile side: onnx, no torch, nothing unpickled) ----------------------------------------------


def read_branched(path: str | Path) -> BranchedNetwork:
    """Read and check a file from `save_early_exit`. Every graph must match its sha256 and pass onnx's checker."""
    import onnx

    path = Path(path)
    if not is_branched_file(path):
        raise InputError(f"{path} is not a branched network from eec.compiler.save_early_exit")
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            if any(i.file_size > MAX_MEMBER_BYTES for i in infos.values()):
                raise InputError(f"{path}: a member is larger than {MAX_MEMBER_BYTES >> 30} GiB")
            spec = _spec(path, z.read(SPEC))
            entries = [*spec["stages"], *spec["exits"], spec["example"]]
            named = [e["file"] for e in entries]
            missing = [n for n in named if n not in infos]
            if missing:
                raise InputError(f"{path}: the spec names {', '.join(missing)}, which the file does not hold")
            graphs = {}
            for entry in entries:
                data = z.read(entry["file"])
                if _sha(data) != entry["sha256"]:
                    raise InputError(f"{path}: {entry['file']} does not match its sha256 (modified or corrupt)")
                graphs[entry["file"]] = data
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path} is not a readable zip file ({e})") from None

    def graph(name: str, inputs: str, outputs: str):
        try:
            model = onnx.load_from_string(graphs[name])
            onnx.checker.check_model(model)
        except Exception as e:  # onnx raises protobuf and checker errors of several types
            raise InputError(f"{path}: {name} is not a valid ONNX graph ({type(e).__name__})") from None
        names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
        if names != ([inputs], [outputs]):
            raise InputError(f"{path}: {name} takes {names[0]} and returns {names[1]}; expected [{inputs!r}] "
                             f"and [{outputs!r}]")
        return model

    stages = [graph(s["file"], STAGE_IN, STAGE_OUT) for s in spec["stages"]]
    exits = {e["stage"]: graph(e["file"], HEAD_IN, HEAD_OUT) for e in spec["exits"]}
    try:
        example = np.load(io.BytesIO(graphs[spec["example"]["file"]]), allow_pickle=False)
    except (ValueError, OSError):
        raise InputError(f"{path}: {spec['example']['file']} is not a numpy array file") from None
    if example.dtype != np.dtype(spec["input"]["dtype"]) or list(example.shape[1:]) != spec["input"]["shape"] \
            or not 1 <= len(example) <= EXAMPLE_SAMPLES:
        raise InputError(f"{path}: the example input {list(example.shape)} {example.dtype} does not fit the spec's input")
    return BranchedNetwork(spec["input"]["shape"], spec["input"]["dtype"], spec["num_classes"], stages, exits,
                           example, spec.get("class_names"), spec.get("metadata") or {})


def _spec(path: Path, raw: bytes) -> dict:
    def bad(what: str) -> InputError:
        return InputError(f"{path}: {SPEC} {what}")

    try:
        spec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("is not JSON") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise bad(f"does not say format {FORMAT!r}")
    if spec.get("version") != VERSION:
        raise bad(f"has version {spec.get('version')!r}; this eec reads version {VERSION}")
    inp = spec.get("input")
    if not (isinstance(inp, dict) and isinstance(inp.get("shape"), list)
            and all(_whole(d, 1, 1 << 20) for d in inp["shape"]) and inp.get("dtype") in INPUT_DTYPES):
        raise bad("'input' must give a shape of whole numbers and a dtype of " + ", ".join(INPUT_DTYPES))
    if not _whole(spec.get("num_classes"), 2, 1 << 20):
        raise bad("'num_classes' must be a whole number of at least 2")
    names = spec.get("class_names")
    if names is not None and not (isinstance(names, list) and len(names) == spec["num_classes"]
                                  and all(isinstance(n, str) for n in names)):
        raise bad("'class_names' must be one name per class")
    stages, exits = spec.get("stages"), spec.get("exits")
    if not (isinstance(stages, list) and stages and isinstance(exits, list) and exits):
        raise bad("needs a list of stages and a list of exits")
    for entry in [*stages, *exits, spec.get("example")]:
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
                and _plain(entry["file"])):
            raise bad(f"entry {entry!r} needs a plain relative 'file' and its 'sha256'")
    keys = [e.get("stage") for e in exits]
    if not all(_whole(k, 0, len(stages) - 1) for k in keys) or len(set(keys)) != len(keys):
        raise bad(f"exits must follow distinct stages 0..{len(stages) - 1}, got {keys}")
    if len(stages) - 1 not in keys:
        raise bad("has no head after the last stage (the final classifier)")
    spec["exits"] = sorted(exits, key=lambda e: e["stage"])
    return spec


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _plain(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(name) and not name.startswith("/") and ".." not in parts and "\\" not in name


__all__ = ["BranchedNetwork", "is_branched_file", "read_branched", "save_early_exit"]
