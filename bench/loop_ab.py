"""Two whole-model decode graphs in the same minimal Python loop, alternated in one process.

Each graph (an eec artifact's `--exits none` segment, or an onnxruntime-genai model.onnx) decodes
greedily from the same prompt ids, its KV bound in place in buffers of 256 positions, with the same
five statements around each call (token and position written, mask bound, run, token read; genai's
token is the argmax of its logits). What this measures is the graphs in a Python loop, without either
runtime: set beside eec's `generate` against its minimal loop (`bench/threads.py`-style tok/s) and
genai's own C++ loop, it splits a gap between the two runtimes into graph and driving.

``--engine ARTIFACT.eec`` measures the driving alone: eec's `Engine.step` (full mode, one row) and the
minimal loop run *the same session* (the artifact's one segment), alternated token by token (which
goes first alternates by round, and both orders count equally), so both
read the same weights at the same addresses and every pair of steps sees the same machine. Two
sessions of the same graph in one process run 1.5-3.5% apart on this machine (each its own prepacked
weights; the later-opened ones faster, medians of 6 rounds), more than the driving costs: only the
same session compares the two loops fairly. Usage:

    .venv/bin/python bench/loop_ab.py EEC.eec/graphs/seg0.onnx GENAI_DIR/model.onnx [ROUNDS] [--vocab N]
    .venv/bin/python bench/loop_ab.py --engine EEC.eec [ROUNDS]

``--vocab N`` takes the prompt's ids modulo N, for a model whose vocabulary is not SmolLM2's.
"""
import sys
import time
import statistics
from pathlib import Path

import numpy as np
import onnxruntime as ort

from eec.runtime.sessions import session_options

TOKENS, CAPACITY, HEAD_DIM = 128, 256, 64  # genai's graph leaves the head size symbolic
# SmolLM2-135M-Instruct's chat-template ids for "Write a short poem about the sea."
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
          2, 198, 1, 4093, 198, 19161, 253, 1345, 11283, 563, 260, 3572, 30, 2, 198, 1, 520, 9531, 198]


class Graph:
    def __init__(self, path: str, options, session: ort.InferenceSession | None = None):
        self.session = session or ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
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

    def decode(self, prompt: list[int] = PROMPT) -> tuple[float, list[int]]:
        steps = self.steps(prompt)
        tokens = [next(steps)]
        start = time.perf_counter()
        for _ in range(TOKENS - 1):
            tokens.append(next(steps))
        return (TOKENS - 1) / (time.perf_counter() - start), tokens

    def steps(self, prompt: list[int] = PROMPT):
        """The prompt's first token, then one token a step."""
        io, n = self.binding(), len(prompt)
        io.bind_cpu_input("input_ids", np.array([prompt], np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, n), np.int64))
        if "position_ids" in self.inputs:
            io.bind_cpu_input("position_ids", np.arange(n, dtype=np.int64)[None])
        for o in self.small:
            io.bind_output(o.name, "cpu")
        self.session.run_with_iobinding(io)
        token = self.token(io.copy_outputs_to_cpu()[len(self.pairs)])  # the presents were bound first
        yield token
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
        while True:
            x[0, 0], position[0, 0] = token, n
            io.bind_cpu_input("attention_mask", ones[:, : n + 1])
            self.session.run_with_iobinding(io)
            n += 1
            token = self.token(fixed[0])
            yield token


def engine_against_loop(artifact: str, rounds: int) -> None:
    """eec's one-row full-mode `Engine.step` and the minimal loop over the same session, a token of
    each in turn (which goes first alternates by round): medians of per-token time ratios."""
    from eec.runtime import load
    from eec.runtime.engine import Engine
    from eec.runtime.kv import PLAIN

    model = load(artifact, threads=2)
    if len(model.manifest.segments) != 1:
        raise SystemExit("--engine takes an artifact of one segment (eec compile --exits none)")
    session = Engine(model, max_batch=1, early_exit=False).batch.kv[0].graphs[PLAIN].session
    prompt = [i % model.manifest.model.vocab_size for i in PROMPT]  # any model's vocabulary
    loop = Graph(str(Path(artifact) / model.manifest.segments[0].file), None, session)
    ratios, eec_us, loop_us = [], [], []
    for r in range(rounds + 1):  # the first round warms up
        engine = Engine(model, max_batch=1, early_exit=False, capacity=64 + TOKENS)
        request = engine.submit(prompt, mode="full", max_new_tokens=TOKENS, ignore_eos=True)
        engine.step()
        steps = loop.steps(prompt)
        tokens = [next(steps)]
        times: dict[str, list[int]] = {"eec": [], "loop": []}
        pair = [("eec", engine.step), ("loop", lambda: tokens.append(next(steps)))]
        for _ in range(TOKENS - 2):
            for name, step in pair if r % 2 else pair[::-1]:
                start = time.perf_counter_ns()
                step()
                times[name].append(time.perf_counter_ns() - start)
        if request.tokens != tokens:  # the same graph from the same prompt: the same greedy tokens
            raise SystemExit(f"eec and the loop decoded different tokens: {request.tokens[:8]} against {tokens[:8]}")
        if r:
            ratios.append(statistics.median([a / b for a, b in zip(times["eec"], times["loop"])]))
            eec_us.append(statistics.median(times["eec"]) / 1e3)
            loop_us.append(statistics.median(times["loop"]) / 1e3)
    # Whichever runs first in a pair pays for the other's call having just streamed the weights: the
    # two orders alternate by round, and the figure is the mean of each order's median.
    first, second = statistics.median(ratios[0::2]), statistics.median(ratios[1::2])
    print(f"eec Engine.step {statistics.median(eec_us):.0f} µs, minimal loop {statistics.median(loop_us):.0f} µs a token "
          f"(one session); eec / loop time: {(first + second) / 2:.4f} (eec first {first:.3f}, the loop first "
          f"{second:.3f}; rounds {', '.join(f'{x:.3f}' for x in ratios)})")


def main() -> None:
    if sys.argv[1] == "--engine":
        engine_against_loop(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 8)
        return
    vocab = None
    if "--vocab" in sys.argv:
        at = sys.argv.index("--vocab")
        vocab = int(sys.argv[at + 1])
        del sys.argv[at: at + 2]
    prompt = [i % vocab for i in PROMPT] if vocab else PROMPT
    options = session_options(2)
    graphs = [Graph(sys.argv[1], options), Graph(sys.argv[2], options)]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    for g in graphs:
        g.decode(prompt)  # warm-up
    speeds = [[], []]
    for _ in range(rounds):
        for g, s in zip(graphs, speeds):
            s.append(g.decode(prompt)[0])
    ratio = statistics.median([a / b for a, b in zip(*speeds)])
    print(f"first {statistics.median(speeds[0]):.1f} tok/s, second {statistics.median(speeds[1]):.1f} tok/s, "
          f"first / second {ratio:.3f} (median of {rounds} alternated rounds, {TOKENS} tokens)")


if __name__ == "__main__":
    main()
