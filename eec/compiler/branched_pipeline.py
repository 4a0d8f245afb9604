"""``compile_branched``: a branched network (`eec.compiler.branched`) -> a classifier artifact, all or nothing.

1. Segments: the kept exits cut the stages into segments; each segment's
   stage graphs are chained (``onnx.compose``) into one graph ``x -> hidden``
   (the plain graph, what full mode runs), and an exit segment gets a second
   graph with its head inside, ``x -> hidden, probs, label`` (what early exit
   runs: one call per segment, the softmax and argmax in the graph). The last
   segment's plain graph ends in the final classifier.
2. Check: every graph is run on a random batch against the stage and head
   graphs run one by one, the same chain `save_early_exit` checked against
   PyTorch.
3. Precision: fp32; fp16 (GPU targets, onnxruntime's converter); int8 (static
   Q/DQ on convolutions and matrix products, activation scales from the
   calibration inputs).
4. Calibration (``data``: an .npz of held-out inputs ``x`` and optional labels
   ``y``): every sample is run through every exit and the probabilities are
   stored, so thresholds for any ε, rule and metric are computed at load time
   (`eec.runtime.classifier`); the default metric is the one that runs the
   fewest stages at ε = 0.99 on them.
5. ``exits="auto"``: every head is compiled and calibrated, each segment's
   latency is measured on this machine at batch 1, and the exit set with the
   lowest expected latency at ``placement_eps`` is kept (an exhaustive search:
   a network has few heads).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from eec import __version__
from eec.compiler.branched import HEAD_IN, HEAD_OUT, STAGE_IN, STAGE_OUT, BranchedNetwork, read_branched
from eec.compiler.weights import store_weights_once
from eec.calib.classifier_calibration import (
    DEFAULT_CRITERION,
    DEFAULT_RULE,
    check_auto_candidates,
    check_meaning,
    place_by_times,
    no_progress,
    read_npz,
    resolve_criterion,
    trace_probs,
    write_calibration,
)
from eec.errors import CompileError, InputError
from eec.runtime.classifier_manifest import (
    HIDDEN,
    INPUT,
    LABEL,
    PROBS,
    ClassifierManifest,
    ClassifierSegment,
    check_fields,
)
from eec.runtime.manifest import MANIFEST, PLAIN, WITH_HEAD, hash_files, replace_dir
from eec.runtime.staging import check_output, new_stage, output_lock
from eec.targets.classifier_profiling import measure
from eec.targets.profiles import get_target

CPU = "onnxruntime-cpu"
PRECISIONS = {CPU: ("fp32", "int8"), "tensorrt": ("fp16", "fp32", "int8"),
              "onnxruntime-cuda": ("fp16", "fp32")}
CHECK_RTOL = 1e-4




def compile_branched(source: str | os.PathLike, out: str | os.PathLike, *, exits: list[int] | str | None = None,
                     target: str = "cpu", precision: str | None = None, data: str | os.PathLike | None = None,
                     metric: str | None = None, placement_eps: float = 0.99, overwrite: bool = False,
                     criterion: str = DEFAULT_CRITERION, rule: str = DEFAULT_RULE, progress=no_progress) -> ClassifierManifest:
    """Compile the branched network file ``source`` into the classifier artifact ``out``.

    ``exits``: the stages whose heads to keep as early exits (default every
    head; ``[]`` none; ``"auto"``, the set with the lowest measured latency at
    ``placement_eps``, which needs ``data``). ``data``: an .npz with ``x``
    (held-out inputs) and optionally ``y`` (their labels), for thresholds
    and static int8. ``criterion`` and ``rule``: what ε means, for placement
    and by default at run time (`EarlyExitClassifier.classify`); by default
    accuracy where ``data`` has labels, else agreement, under one threshold
    for every exit (`DEFAULT_CRITERION`, `DEFAULT_RULE`).
    """
    out = Path(out).absolute()
    tgt = get_target(target, placed=exits == "auto")
    allowed = PRECISIONS[tgt.backend]
    precision = precision or ("fp32" if tgt.backend == CPU else "fp16")
    if precision not in allowed:
        raise InputError(f"precision {precision!r} is not available for a classifier on target {tgt.name!r}; "
                         f"choose from {', '.join(allowed)}")
    check_output(out, overwrite)
    if metric is not None:
        from eec.runtime.classifier import METRICS

        if metric not in METRICS:
            raise InputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if not 0.0 <= placement_eps <= 1.0:
        raise InputError(f"--eps must be in [0, 1], got {placement_eps}")
    check_meaning(criterion, rule, data)
    if data is None and (precision == "int8" or exits == "auto"):
        raise InputError(f"{'static int8' if precision == 'int8' else '--exits auto'} needs calibration inputs: "
                         "pass --data calib.npz (held-out inputs x, optional labels y)")
    progress("reading network", 0, 1)
    net = read_branched(source)
    heads = [k for k in net.exits if k != net.final]
    if exits is None or exits == "auto":
        kept = heads
    else:
        unknown = [k for k in exits if k not in heads]
        if unknown:
            raise InputError(f"--exits {unknown}: no head follows {'that stage' if len(unknown) == 1 else 'those stages'}; "
                             f"the network's early exits follow stages {heads or 'none'}")
        kept = sorted(set(exits))
    x, y = (None, None) if data is None else read_data(Path(data), net)
    criterion = resolve_criterion(criterion, y, data)
    meaning = {"criterion": criterion, "rule": rule}

    with output_lock(out):
        check_output(out, overwrite)
        tmp = new_stage(out, "build")
        try:
            placement = None
            if exits == "auto":
                kept, placement = place_exits(net, heads, precision, x, placement_eps, metric, progress,
                                              for_cpu=tgt.backend == CPU, rule=rule,
                                              labels=y if criterion == "accuracy" else None)
                metric = metric or placement["metric"]
            manifest = _build(net, kept, tmp, tgt.name, precision, x, y, metric, progress, Path(source), placement,
                              meaning)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest


def read_data(path: Path, net: BranchedNetwork) -> tuple[np.ndarray, np.ndarray | None]:
    """Held-out inputs ``x`` and optional labels ``y`` from an .npz, checked against the network."""
    x, y = read_npz(path)
    if x.dtype != np.dtype(net.input_dtype):
        raise InputError(f"{path}: x is {x.dtype}; the network takes {net.input_dtype}")
    if list(x.shape[1:]) != net.input_shape or x.shape[0] < 1:
        raise InputError(f"{path}: x has shape {list(x.shape)}; the network takes "
                         f"[samples, {', '.join(map(str, net.input_shape))}]")
    if not np.isfinite(x).all():
        raise InputError(f"{path}: x holds NaN or infinite values")
    if y is not None and y.size and (y.min() < 0 or y.max() >= net.num_classes):
        raise InputError(f"{path}: y must be {x.shape[0]} whole-number labels in 0..{net.num_classes - 1}")
    return x, y


# --- graphs --------------------------------------------------------------------------------------------------


def _renamed(model, renames: dict[str, str]):
    """A copy of ``model`` with values renamed (graph inputs, outputs and every node's uses)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for v in [*g.input, *g.output, *g.value_info]:
        v.name = renames.get(v.name, v.name)
    for node in g.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    return model


def _join(first, second, io_map: list[tuple[str, str]], outputs: list[str]):
    import onnx.compose

    return onnx.compose.merge_models(first, second, io_map=io_map, outputs=outputs)


def _class_outputs(like):
    """``logits -> probs, label``: the softmax and argmax every head ends in, in ``like``'s opset."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["logits"], [PROBS], axis=-1),
         helper.make_node("ArgMax", ["logits"], [LABEL], axis=-1, keepdims=0)],
        "class_outputs",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "classes"])],
        [helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["batch", "classes"]),
         helper.make_tensor_value_info(LABEL, TensorProto.INT64, ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=list(like.opset_import))
    model.ir_version = like.ir_version
    return model


def segment_graphs(net: BranchedNetwork, start: int, stop: int, last: bool) -> dict[str, object]:
    """The graphs of the segment of stages ``start..stop-1`` by role (see the module's docstring)."""
    import onnx.compose

    chain = None
    for i in range(start, stop):
        stage = onnx.compose.add_prefix(net.stages[i], f"stage{i}/")
        if chain is None:
            chain = _renamed(stage, {f"stage{i}/{STAGE_IN}": INPUT})
        else:
            chain = _join(chain, stage, [(f"stage{i - 1}/{STAGE_OUT}", f"stage{i}/{STAGE_IN}")],
                          [f"stage{i}/{STAGE_OUT}"])
    chain = _renamed(chain, {f"stage{stop - 1}/{STAGE_OUT}": HIDDEN})
    head = onnx.compose.add_prefix(net.exits[stop - 1], f"exit{stop - 1}/")
    logits = f"exit{stop - 1}/{HEAD_OUT}"
    keep = [] if last else [HIDDEN]
    with_head = _join(chain, head, [(HIDDEN, f"exit{stop - 1}/{HEAD_IN}")], [*keep, logits])
    with_head = _join(with_head, _class_outputs(with_head), [(logits, "logits")], [*keep, PROBS, LABEL])
    return {PLAIN: with_head} if last else {PLAIN: chain, WITH_HEAD: with_head}


def _check_graphs(net: BranchedNetwork, segments: list[ClassifierSegment], graphs: list[dict]) -> None:
    """Each segment's graphs against the stage and head graphs run one by one, on the network's example inputs."""
    def run(model, feeds):
        return session(model).run(None, feeds)

    x = net.example
    for seg, roles in zip(segments, graphs):
        expected = x
        for i in range(seg.start, seg.stop):
            expected, = run(net.stages[i], {STAGE_IN: expected})
        logits, = run(net.exits[seg.exit], {HEAD_IN: expected})
        z = np.exp(logits - logits.max(-1, keepdims=True))
        want = {HIDDEN: expected, PROBS: z / z.sum(-1, keepdims=True)}
        for role, model in roles.items():
            names = [o.name for o in model.graph.output]
            for name, got in zip(names, run(model, {INPUT: x})):
                if name not in want:
                    continue
                e = want[name]
                err = float(np.max(np.abs(got - e)) / (1.0 + np.max(np.abs(e))))
                if got.shape != e.shape or not err <= CHECK_RTOL:
                    raise CompileError(f"the {role} graph of stages {seg.start}-{seg.stop - 1} disagrees with its "
                                       f"stages run one by one on {name} (relative error {err:.2e})")
        x = expected


def build_graphs(net: BranchedNetwork, kept: list[int], precision: str, x, progress=no_progress,
                 for_cpu: bool = True) -> tuple[list[ClassifierSegment], list[dict]]:
    """The segments for the early exits after stages ``kept``, and each one's graphs by role, checked and
    in ``precision`` (in memory: written by `_build`, measured by `place_exits`)."""
    cuts = [*kept, net.final]
    segments, graphs = [], []
    start = 0
    for k, stop_stage in enumerate(cuts):
        progress("building segment graphs", k, len(cuts))
        seg_graphs = segment_graphs(net, start, stop_stage + 1, last=k == len(cuts) - 1)
        files = {role: f"graphs/seg{k}{'' if role == PLAIN else '_' + role}.onnx" for role in seg_graphs}
        segments.append(ClassifierSegment(files, start, stop_stage + 1))
        graphs.append(seg_graphs)
        start = stop_stage + 1
    progress("checking graphs", 0, 1)
    _check_graphs(net, segments, graphs)
    if precision != "fp32":
        graphs = _apply_precision(graphs, precision, x, progress, for_cpu=for_cpu)
    return segments, graphs


def _build(net: BranchedNetwork, kept: list[int], tmp: Path, target: str, precision: str, x, y, metric,
           progress, source: Path, placement: dict | None, meaning: dict | None = None) -> ClassifierManifest:
    import onnx

    segments, graphs = build_graphs(net, kept, precision, x, progress, for_cpu=get_target(target).backend == CPU)
    (tmp / "graphs").mkdir()
    for seg, seg_graphs in zip(segments, graphs):
        for role, model in seg_graphs.items():
            onnx.save(model, tmp / seg.graphs[role])
    store_weights_once(tmp, segments)
    manifest = ClassifierManifest(
        input_shape=list(net.input_shape), input_dtype=net.input_dtype, num_classes=net.num_classes,
        num_stages=len(net.stages), segments=segments, precision=precision, target=target,
        class_names=net.class_names, eec_version=__version__, source=source.name, placement=placement,
    )
    if x is not None:
        probs = trace_probs(_sessions(graphs), manifest.num_classes, x, progress)
        manifest = write_calibration(tmp, manifest, probs, y, metric, **(meaning or {}))
    return _finish(tmp, manifest)


def _finish(tmp: Path, manifest: ClassifierManifest) -> ClassifierManifest:
    manifest = replace(manifest, files=hash_files(tmp))
    check_fields(manifest)
    (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


# --- precision -------------------------------------------------------------------------------------------------


def _apply_precision(graphs: list[dict], precision: str, x, progress, for_cpu: bool = True) -> list[dict]:
    import onnx_ir as ir

    if precision == "fp16":
        from eec.compiler.passes import Float16

        return [{role: ir.serde.serialize_model(Float16()(ir.serde.deserialize_model(m)).model)
                 for role, m in roles.items()} for roles in graphs]
    # int8: each graph's activation scales from its own inputs on the calibration set (fp32 upstream)
    from eec.compiler.passes import Int8StaticQDQ

    feeds, out = x[:256], []
    for k, roles in enumerate(graphs):
        progress("quantizing segments (int8)", k, len(graphs))
        batches = [{INPUT: feeds[i:i + 32]} for i in range(0, len(feeds), 32)]
        quantized = {}
        for role, model in roles.items():
            result = Int8StaticQDQ(batches, op_types=("Conv", "MatMul", "Gemm"), for_cpu=for_cpu)(ir.serde.deserialize_model(model))
            quantized[role] = ir.serde.serialize_model(result.model)
        out.append(quantized)
        if k < len(graphs) - 1:  # the next segment's inputs: this segment's fp32 hidden state
            feeds = _run(roles[PLAIN], feeds, HIDDEN)
    return out


def _run(model, x: np.ndarray, output: str, batch: int = 256) -> np.ndarray:
    run = session(model).run
    return np.concatenate([run([output], {INPUT: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


# --- calibration and placement ---------------------------------------------------------------------------------


def session(model):
    """A CPU session on an in-memory graph, in the process-wide thread pool (`eec.runtime.sessions`)."""
    import onnxruntime as ort

    from eec.runtime.sessions import session_options

    return ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])


def _sessions(graphs: list[dict]) -> list:
    """A session per segment: its with-head graph, the last segment's plain one."""
    return [session(roles.get(WITH_HEAD, roles[PLAIN])) for roles in graphs]


def place_exits(net: BranchedNetwork, heads: list[int], precision: str, x, eps: float, metric: str | None,
                progress=no_progress, for_cpu: bool = True, rule: str = "risk",
                labels=None) -> tuple[list[int], dict]:
    """The early exits (a subset of ``heads``) with the lowest expected latency at ``eps`` on ``x``: every head
    built, each segment between consecutive heads timed here at batch 1 with its head inside and without
    (`place_by_times` prices the head as the difference and every subset)."""
    check_auto_candidates(heads)
    segments, graphs = build_graphs(net, heads, precision, x, progress, for_cpu=for_cpu)
    sessions = _sessions(graphs)
    progress("measuring segment latency", 0, 1)
    with_head = measure(sessions, x)
    plain = measure([session(roles[PLAIN]) for roles in graphs[:-1]], x, heads=False)
    probs = trace_probs(sessions, net.num_classes, x, progress)
    return place_by_times(probs, with_head, plain, heads, eps, metric, rule=rule, labels=labels)
