"""One decode step of an eec segment graph against onnxruntime-genai's graph for the same weights, graph
only (no runtime loop), interleaved, through IO binding with each past/present KV pair sharing one buffer
(``--concat``: fresh presents, numpy pasts through ``run()``, eec's path before the shared KV buffers). Usage:

    .venv/bin/python bench/graph_ab.py EEC.eec/segments/seg0.onnx GENAI_DIR/model.onnx [--past 150] [--threads 1]

Both graphs must be whole models (eec: `--exits none`), so one call is one token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def prepare(path: str, threads: int, past: int, capacity: int, concat: bool, head_dim: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    kv_in = [i for i in session.get_inputs() if "past" in i.name]
    kv_out = [o.name for o in session.get_outputs() if "present" in o.name]
    kv_heads = kv_in[0].shape[1]
    small = {"input_ids": np.array([[5]], np.int64), "position_ids": np.array([[past]], np.int64),
             "attention_mask": np.ones((1, past + 1), np.int64)}
    small = {i.name: small[i.name] for i in session.get_inputs() if i.name in small}
    if concat:
        feeds = dict(small, **{i.name: np.random.rand(1, kv_heads, past, head_dim).astype(np.float32) for i in kv_in})
        return lambda: session.run(None, feeds)
    io = session.io_binding()
    keep = []
    for o in session.get_outputs():
        if o.name not in kv_out:
            io.bind_output(o.name, "cpu")
    for i, o in zip(kv_in, kv_out):
        buf = np.random.rand(1, kv_heads, capacity, head_dim).astype(np.float32)
        keep.append(buf)
        io.bind_input(i.name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        io.bind_output(o, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    for name, value in small.items():
        io.bind_cpu_input(name, value)
    return lambda: (keep, session.run_with_iobinding(io))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eec")
    parser.add_argument("genai")
    parser.add_argument("--past", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--concat", action="store_true", help="numpy pasts through run(), fresh presents")
    parser.add_argument("--head-dim", type=int, default=64, help="genai's graph leaves it symbolic")
    args = parser.parse_args()
    runs = {name: prepare(path, args.threads, args.past, args.past + 256, args.concat, args.head_dim)
            for name, path in (("eec", args.eec), ("genai", args.genai))}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            run()
            start = time.perf_counter()
            for _ in range(args.calls):
                run()
            times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    mode = "run() with numpy pasts" if args.concat else "IO binding, shared past/present buffers"
    print(f"{mode}, {args.threads} thread(s), {args.past} cached positions, median of {args.rounds} x {args.calls}")
    for name, values in times.items():
        print(f"{name:6} {statistics.median(values):7.1f} us per call")


if __name__ == "__main__":
    main()
