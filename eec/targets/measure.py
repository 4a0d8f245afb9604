"""`eec targets measure`: time a compiled artifact's segments and heads on this device.

Each segment runs over 1..8 new tokens after ``past`` cached positions (one
decode step plus up to seven pending catch-up positions), through the
runtime's own segment state (`eec.runtime.kv.SegmentKV`: shared KV
buffers and IO binding where the segment has them), each head over one
position through the runtime's own head call (`HeadCall`), a segment with its exit head inside
(`--fuse-heads`) over one position as early exit runs it, and a segment's KV fill graph (`--catch-up propagate`) over
1..8 positions just before it, all in chain order pass after pass as
decoding runs them; the median of ``repeats`` passes is kept, the lowest
of `SWEEPS` sweeps over the lengths (alternately up and down). The per-call overhead is
the median time of a graph that does nothing but pass a hidden state
through, with the same session options. numpy and onnxruntime only.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from eec.errors import InputError
from eec.runtime.kv import FILL, PLAIN, ROLES, VERIFY, WITH_HEAD, HeadCall, SegmentKV
from eec.runtime.manifest import Manifest, read_manifest
from eec.runtime.sessions import CUDA, open_graphs, open_sessions, pick_device, session_options
from eec.targets.latency import MAX_SEQ, LatencyTable, ModelShape, fit_host, fit_segment_overhead
from eec.targets.profiles import get_target

SWEEPS = 4  # over the call lengths, alternately up and down; each length keeps its lowest median


def shape_of(manifest: Manifest) -> ModelShape:
    m = manifest.model
    return ModelShape(m.family, m.num_layers, m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads,
                      m.head_dim, m.vocab_size)


def other_cpu_use(seconds: float = 0.3) -> float | None:
    """Cores' worth of CPU that other work used over ``seconds`` while this process slept (Linux's
    /proc/stat; None elsewhere). Timings taken beside such work describe a shared machine: a pool
    that splits kernels across every core slows down far more than the busy share (docs/design-notes.md)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, 1.0 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def busy_warning(threshold: float = 0.5) -> str | None:
    """A one-line warning when other work is using at least ``threshold`` of a core."""
    used = other_cpu_use()
    if used is None or used < threshold:
        return None
    return (f"other work is using {used:.1f} cores of this machine: the timings will include it, "
            "and placement made from them may be off (measure on a quiet machine)")


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # first call allocates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _overhead(hidden: int, repeats: int, device: str = "cpu") -> float:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["hidden"], ["out"])], "noop",
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, 1, hidden])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, hidden])])
    # IR 10 (onnx 1.16): a newer onnx writes an IR version an older onnxruntime refuses.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    providers = [CUDA, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=providers)
    x = np.zeros((1, 1, hidden), dtype=np.float32)
    return _median_time(lambda: session.run(None, {"hidden": x}), repeats)


def measure_artifact(path: Path, past: int = 128, repeats: int = 20,
                     progress: Callable[[str, int, int], None] = lambda *a: None,
                     device: str | None = None, batch: int = 1, host: bool = True) -> LatencyTable:
    """``device``: "cpu" or "cuda" (default: the target's, the CUDA provider for target ``cuda``);
    ``batch``: also time each segment's decode step over that many rows (`LatencyTable.rows`);
    ``host``: also time eec's own work around the calls of a decode step, on the CPU
    (`LatencyTable.host_samples`)."""
    root = Path(path)
    manifest = read_manifest(root)
    target = get_target(manifest.target)
    if target.builds_engines:  # timed where it will run: its engines, through onnxruntime's TensorRT provider
        try:
            if device not in (None, "tensorrt"):
                raise InputError(device)
            device = pick_device("tensorrt", manifest)
        except InputError:
            raise InputError(f"{root} targets {target.name} (TensorRT): it is measured through its engines, on "
                             "that device after `eec build-engines`, with onnxruntime's TensorRT provider") from None
    else:
        device = pick_device(device or ("cuda" if target.backend == "onnxruntime-cuda" else "cpu"), manifest)
    m = manifest.model
    if m.intermediate_size == 0:
        raise InputError(f"{root} was compiled by an older eec without the model's MLP size; recompile it")
    past = max(0, min(past, m.context_length - MAX_SEQ))  # the longest call must fit in the context
    rng = np.random.default_rng(0)
    graphs = open_graphs(root, manifest, ROLES, device=device)
    heads = {s.exit.layer: s.exit.file for s in manifest.segments[:-1] if s.exit and s.exit.file}
    head_calls = {layer: HeadCall(s, device) for layer, s in zip(heads, open_sessions(root, list(heads.values()), manifest=manifest, device=device))}
    total = SWEEPS * MAX_SEQ * (repeats + 1)
    done = 0
    table = LatencyTable(shape_of(manifest), manifest.precision, target.name, "measured", 0.0)
    calls, fill_calls, with_head_calls, verify_calls = [], [], [], []
    for spec, segment_graphs in zip(manifest.segments, graphs):
        state = SegmentKV(spec, segment_graphs, m.num_kv_heads, m.head_dim, 1, past + MAX_SEQ, m.context_length,
                          device=device)
        pasts = [rng.standard_normal((1, m.num_kv_heads, past, m.head_dim)).astype(state.kv_dtype)
                 for _ in range(state.layers)]
        state.write_kv(pasts)

        def after_past(role, spec=spec, state=state, pasts=pasts):
            """The segment's ``role`` graph appending after the same cached positions every call."""
            if not state.has(role):
                return None

            def call(x):
                if spec.kv_cache != "shared":
                    state.row_kv[0] = pasts
                state.length = past
                state.call(role, [0], x)
            return call

        calls.append(after_past(PLAIN))
        fill_calls.append(after_past(FILL))
        with_head_calls.append(after_past(WITH_HEAD))
        verify_calls.append(after_past(VERIFY))
    head_x = rng.standard_normal((1, 1, m.hidden_size)).astype(np.float32)
    head_times: dict[int, list[float]] = {layer: [] for layer in head_calls}
    with_head_best: dict[int, float] = {}  # segment index -> lowest per-sweep median, one position
    # Every pass runs the whole chain in order, as decoding does, and times each call in it: a
    # segment timed alone in a loop keeps its weights in the CPU's caches, which decoding never does
    # once the model is larger than them (SmolLM2: its six segments timed alone summed to 2.8 ms,
    # the same layers as one graph took 4.4 ms, and decoding either way took 4.5 ms a token).
    # Sweeps over the call lengths, up then down and again, each length's passes back to back (a call
    # whose shape differs from the last one pays onnxruntime's re-planning, which decoding rarely does);
    # each length keeps the lowest of its medians, so a slow spell on a shared machine during one
    # sweep does not land on some lengths only (it once made 1 token cost more than 2 and the
    # catch-up's marginal cost vanish from placement; with two sweeps, one spell still put a 3-layer
    # segment at 186 us for 3 positions against 126 in the next measurement).
    seqs = list(range(1, MAX_SEQ + 1))
    best: dict[int, list[float]] = {}
    best_fill: dict[int, list[float]] = {}
    best_verify: dict[int, list[float]] = {}
    for order in [seqs, seqs[::-1]] * (SWEEPS // 2):
        for seq in order:
            xs = [rng.integers(0, m.vocab_size, (1, seq)) if spec.takes_ids
                  else rng.standard_normal((1, seq, m.hidden_size)).astype(np.float32) for spec in manifest.segments]
            times: list[list[float]] = [[] for _ in calls]
            fill_times: list[list[float]] = [[] for _ in calls]
            with_head_times: list[list[float]] = [[] for _ in calls]
            verify_times: list[list[float]] = [[] for _ in calls]
            for r in range(repeats + 1):  # the first pass allocates and is not kept
                progress(f"{seq} token(s) per call, pass {r + 1}", done, total)
                for j, (spec, call) in enumerate(zip(manifest.segments, calls)):
                    if fill_calls[j] is not None:  # as decoding runs it: just before its segment
                        start = time.perf_counter()
                        fill_calls[j](xs[j])
                        if r:
                            fill_times[j].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    call(xs[j])
                    elapsed = time.perf_counter() - start
                    layer = spec.exit.layer if spec.exit else None
                    head = head_calls.get(layer) if seq == 1 else None
                    if head is not None:
                        start = time.perf_counter()
                        head(head_x)
                        if r:
                            head_times[layer].append(time.perf_counter() - start)
                    if seq == 1 and with_head_calls[j] is not None:  # as early exit runs it: segment and head in one
                        start = time.perf_counter()
                        with_head_calls[j](xs[j])
                        if r:
                            with_head_times[j].append(time.perf_counter() - start)
                    if r:
                        times[j].append(elapsed)
                if verify_calls[-1] is not None:
                    # Speculative mode's call over the drafts, in a chain of its own as it runs: after the
                    # earlier segments, not right after the last one's own call, whose weights it would find cached.
                    for earlier, x in zip(calls[:-1], xs):
                        earlier(x)
                    start = time.perf_counter()
                    verify_calls[-1](xs[-1])
                    if r:
                        verify_times[-1].append(time.perf_counter() - start)
                done += 1
            for j, t in enumerate(with_head_times):
                if t:
                    with_head_best[j] = min(with_head_best.get(j, float("inf")), statistics.median(t))
            for store, measured in ((best, times), (best_fill, fill_times), (best_verify, verify_times)):
                medians = [statistics.median(t) if t else 0.0 for t in measured]
                store[seq] = [min(a, b) for a, b in zip(store[seq], medians)] if seq in store else medians
    for seq in seqs:
        for j, spec in enumerate(manifest.segments):
            table.segments.setdefault((spec.start, spec.stop), []).append(best[seq][j])
            if fill_calls[j] is not None:
                table.fills.setdefault((spec.start, spec.stop), []).append(best_fill[seq][j])
            if verify_calls[j] is not None:
                table.verifies.setdefault((spec.start, spec.stop), []).append(best_verify[seq][j])
    table.heads = {layer: statistics.median(t) for layer, t in head_times.items()}
    table.with_head = {(manifest.segments[j].start, manifest.segments[j].stop): t for j, t in with_head_best.items()}
    table.call_overhead = _overhead(m.hidden_size, repeats * 5, "cuda" if device == "tensorrt" else device)  # one artifact's cuts never overlap: no fit here
    if batch > 1:
        for spec, t in zip(manifest.segments, _rows_times(manifest, graphs, past, repeats, batch, device, rng, progress)):
            table.rows[(spec.start, spec.stop)] = {batch: t}
    if host and device == "cpu":
        exits = len([s for s in manifest.segments[:-1] if s.exit])
        table.host_samples = [[rows, len(manifest.segments), exits, *_host_times(root, rows, repeats, rng)]
                              for rows in sorted({1, batch})]
    progress("done", total, total)
    return table


def _host_times(root: Path, rows: int, repeats: int, rng) -> tuple[float, float]:
    """Median seconds of eec's own work in a decode step of ``rows`` sequences, outside its graph calls:
    in full mode, and with every exit asked and none taken (thresholds of +inf). The runtime's `Batch`
    decodes from prompts of 8 random tokens for up to 2 x ``repeats`` steps (fewer where the model's
    context is shorter), its segment and head calls timed where they are made (`SegmentKV.call`,
    `HeadCall.batch`) and taken from each step's wall time."""
    from eec.runtime import load

    model = load(root)
    vocab, context = model.manifest.model.vocab_size, model.manifest.model.context_length
    prompt = min(8, max(context // 4, 1))
    steps = max(min(2 * repeats + 1, context - prompt - 1), 2)  # a row's prompt and steps fit the context
    spent = [0.0]

    def timed(fn):
        def call(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - start
        return call

    medians = []
    for thresholds in (None, {e: math.inf for e in model.exits}):
        batch = model.new_batch(rows, capacity=prompt + steps + 1, early_exit=thresholds is not None)
        for kv in batch.kv:
            kv.call = timed(kv.call)
        for head in batch.heads:
            if head is not None:
                head.batch = timed(head.batch)
        slots = list(range(rows))
        results = batch.prefill(slots, [rng.integers(0, vocab, prompt).tolist() for _ in slots])
        hosts = []
        for r in range(steps):  # the first step allocates and is not kept
            spent[0] = 0.0
            start = time.perf_counter()
            results = batch.step(slots, [[res.token] for res in results], thresholds)
            if r:
                hosts.append(time.perf_counter() - start - spent[0])
        medians.append(max(statistics.median(hosts), 0.0))
    return medians[0], medians[1]


def _rows_times(manifest: Manifest, graphs: list, past: int, repeats: int, batch: int, device: str, rng,
                progress) -> list[float]:
    """Each segment's plain call over ``batch`` rows at one position each, every row after ``past``
    cached positions of its own, in chain order pass after pass as a batch's decode step runs them
    (the rows' positions are what the runtime's step gives the segment: `eec.runtime.core`); the
    lowest of `SWEEPS` medians of ``repeats`` passes."""
    m = manifest.model
    calls = []
    for spec, segment_graphs in zip(manifest.segments, graphs):
        state = SegmentKV(spec, {PLAIN: segment_graphs[PLAIN]}, m.num_kv_heads, m.head_dim, batch, past + 1,
                          m.context_length, device=device)
        slots = list(range(batch))
        pasts = [rng.standard_normal((1, m.num_kv_heads, past, m.head_dim)).astype(state.kv_dtype)
                 for _ in range(state.layers)]
        for slot in slots:
            state.write_kv(pasts, slot)

        def call(x, spec=spec, state=state, pasts=pasts, slots=slots):
            if spec.kv_cache != "shared":
                for slot in slots:
                    state.row_kv[slot] = pasts
            state.lengths[:] = past
            state.call(PLAIN, slots, x)
        calls.append(call)
    best = [float("inf")] * len(calls)
    for sweep in range(SWEEPS):
        xs = [rng.integers(0, m.vocab_size, (batch, 1)) if spec.takes_ids
              else rng.standard_normal((batch, 1, m.hidden_size)).astype(np.float32) for spec in manifest.segments]
        times: list[list[float]] = [[] for _ in calls]
        for r in range(repeats + 1):  # the first pass allocates and is not kept
            progress(f"{batch} sequences a call, pass {r + 1}", sweep * (repeats + 1) + r, SWEEPS * (repeats + 1))
            for j, call in enumerate(calls):
                start = time.perf_counter()
                call(xs[j])
                if r:
                    times[j].append(time.perf_counter() - start)
        best = [min(b, statistics.median(t)) for b, t in zip(best, times)]
    return best


def measure_artifacts(paths: list[Path], past: int = 128, repeats: int = 20,
                      progress: Callable[[str, int, int], None] = lambda *a: None, batch: int = 1) -> LatencyTable:
    """One table from several artifacts of the same model, precision and target: their segments and
    heads together. An artifact cut at every candidate exit and one without exits give placement
    both the per-layer costs and the fixed cost of a segment call (`fit_segment_overhead`)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"--batch must be a whole number of at least 1, got {batch!r}")
    tables = [measure_artifact(p, past, repeats, progress, batch=batch) for p in paths]
    first = tables[0]
    for path, t in zip(paths[1:], tables[1:]):
        if (t.shape, t.precision, t.target) != (first.shape, first.precision, first.target):
            raise InputError(f"{path} is another model, precision or target than {paths[0]}; "
                             "a profile covers one of each")
        first.segments.update(t.segments)
        first.heads.update(t.heads)
        first.fills.update(t.fills)
        first.with_head.update(t.with_head)
        first.verifies.update(t.verifies)
        first.rows.update(t.rows)
        first.host_samples += t.host_samples
    first.segment_overhead = fit_segment_overhead(first.segments)
    first.host = fit_host(first.host_samples)
    return first
