"""Two whole-model decode graphs in the same minimal Python loop, alternated in one process.

Each graph (an eec artifact's `--exits none` segment, or an onnxruntime-genai model.onnx) decodes
greedily from the same prompt ids, its KV bound in place in buffers of 256 positions, with the same
five statements around each call (token and position written, mask bound, run, token read; genai's
token is the argmax of its logits). What this measures is the graphs in a Python loop, without either
runtime: set beside eec's `generate` against its minimal loop (`bench/threads.py`-style tok/s) and
genai's own C++ loop, it splits a gap between the two runtimes into graph and driving. Usage:

    .venv/bin/python bench/loop_ab.py EEC.eec/graphs/seg0.onnx GENAI_DIR/model.onnx [ROUNDS]
"""
import sys
import time
import statistics

import numpy as np
import onnxruntime as ort

from eec.runtime.sessions import session_options

TOKENS, CAPACITY, HEAD_DIM = 128, 256, 64  # genai's graph leaves the head size symbolic
# SmolLM2-135M-Instruct's chat-template ids for "Write a short poem about the sea."
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
          2, 198, 1, 4093, 198, 19161, 253, 1345, 11283, 563, 260, 3572, 30, 2, 198, 1, 520, 9531, 198]


class Graph:
    def __init__(self, path: str, options):
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        outputs = self.session.get_outputs()
        past = [i for i in self.session.get_inputs() if "past" in i.name]
        self.presents = [o.name for o in outputs if "present" in o.name]
        self.small = [o for o in outputs if "present" not in o.name]
        self.pairs = list(zip([i.name for i in past], self.presents))
        self.buffers = [np.zeros((1, i.shape[1], CAPACITY, HEAD_DIM), np.float32) for i in past]
        self.argmax = self.small[0].name == "logits"  # genai returns logits, eec its token first

    def binding(self):
        io = self.session.io_binding()
        for (name_in, name_out), buf in zip(self.pairs, self.buffers):
            io.bind_input(name_in, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            io.bind_output(name_out, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        return io

    def token(self, first: np.ndarray) -> int:
        return int(first.reshape(-1, first.shape[-1])[-1].argmax()) if self.argmax else int(first.reshape(-1)[-1])

    def decode(self) -> tuple[float, list[int]]:
        io, n = self.binding(), len(PROMPT)
        io.bind_cpu_input("input_ids", np.array([PROMPT], np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, n), np.int64))
        if "position_ids" in self.inputs:
            io.bind_cpu_input("position_ids", np.arange(n, dtype=np.int64)[None])
        for o in self.small:
            io.bind_output(o.name, "cpu")
        self.session.run_with_iobinding(io)
        tokens = [self.token(io.copy_outputs_to_cpu()[0])]
        io = self.binding()  # a fresh binding for the one-position calls
        x, position, ones = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64), np.ones((1, CAPACITY), np.int64)
        io.bind_input("input_ids", "cpu", 0, np.int64, [1, 1], x.ctypes.data)
        if "position_ids" in self.inputs:
            io.bind_input("position_ids", "cpu", 0, np.int64, [1, 1], position.ctypes.data)
        fixed = []
        for o in self.small:
            array = np.zeros([d if isinstance(d, int) else 1 for d in o.shape], np.int64 if "int64" in o.type else np.float32)
            io.bind_output(o.name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            fixed.append(array)
        start = time.perf_counter()
        for _ in range(TOKENS - 1):
            x[0, 0], position[0, 0] = tokens[-1], n
            io.bind_cpu_input("attention_mask", ones[:, : n + 1])
            self.session.run_with_iobinding(io)
            n += 1
            tokens.append(self.token(fixed[0]))
        return (TOKENS - 1) / (time.perf_counter() - start), tokens


def main() -> None:
    options = session_options(2)
    graphs = [Graph(sys.argv[1], options), Graph(sys.argv[2], options)]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    for g in graphs:
        g.decode()  # warm-up
    speeds = [[], []]
    for _ in range(rounds):
        for g, s in zip(graphs, speeds):
            s.append(g.decode()[0])
    ratio = statistics.median([a / b for a, b in zip(*speeds)])
    print(f"first {statistics.median(speeds[0]):.1f} tok/s, second {statistics.median(speeds[1]):.1f} tok/s, "
          f"first / second {ratio:.3f} (median of {rounds} alternated rounds, {TOKENS} tokens)")


if __name__ == "__main__":
    main()
