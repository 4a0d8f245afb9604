"""Two whole-model decode graphs in the same minimal Python loop, alternated in one process.

Each graph (an eec artifact's `--exits none` segment, or an onnxruntime-genai model.onnx) decodes
greedily from the same prompt ids, its KV bound in place in buffers of 256 positions, with the same
five statements around each call (token and position written, mask bound, run, token read; genai's
token is the argmax of its logits). What this measures is the graphs in a Python loop, without either
runtime: set beside eec's `generate` against its minimal loop (`bench/threads.py`-style tok/s) and
genai's own C++ loop, it splits a gap between the two runtimes into graph and driving.

``--engine ARTIFACT.eec`` measures the driving alone: eec's `Engine.step` (full mode, one row, or
``--batch B`` rows) and the minimal loop run *the same session* (the artifact's one segment), alternated
step by step (which
goes first alternates by round, and both orders count equally), so both
read the same weights at the same addresses and every pair of steps sees the same machine. Two
sessions of the same graph in one process run 1.5-3.5% apart on this machine (each its own prepacked
weights; the later-opened ones faster, medians of 6 rounds), more than the driving costs: only the
same session compares the two loops fairly. Usage:

    .venv/bin/python bench/loop_ab.py EEC.eec/graphs/seg0.onnx GENAI_DIR/model.onnx [ROUNDS] [--vocab N]
    .venv/bin/python bench/loop_ab.py --engine EEC.eec [ROUNDS] [--batch B]

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
        self.past = past
        self.argmax = self.small[0].name == "logits"  # genai returns logits, eec its token first

    def binding(self):
        io = self.session.io_binding()
        for (name_in, name_out), buf in zip(self.pairs, self.buffers):
            io.bind_input(name_in, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            io.bind_output(name_out, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        return io

    def tokens(self, first: np.ndarray) -> np.ndarray:
        """Each row's next token from the call's first small output (its last position)."""
        rows = first.shape[0]
        if self.argmax:
            return first.reshape(rows, -1, first.shape[-1])[:, -1].argmax(-1)
        return first.reshape(rows, -1)[:, -1].copy()  # the next call overwrites the bound output

    def decode(self, prompt: list[int] = PROMPT) -> tuple[float, list[int]]:
        steps = (int(t[0]) for t in self.steps([prompt]))
        tokens = [next(steps)]
        start = time.perf_counter()
        for _ in range(TOKENS - 1):
            tokens.append(next(steps))
        return (TOKENS - 1) / (time.perf_counter() - start), tokens

    def steps(self, prompts: list[list[int]]):
        """The prompts' (one a row, all of one length) first tokens, then each row's next one a step."""
        rows, n = len(prompts), len(prompts[0])
        self.buffers = [np.zeros((rows, i.shape[1], CAPACITY, HEAD_DIM), np.float32) for i in self.past]
        io = self.binding()
        io.bind_cpu_input("input_ids", np.array(prompts, np.int64))
        io.bind_cpu_input("attention_mask", np.ones((rows, n), np.int64))
        if "position_ids" in self.inputs:
            io.bind_cpu_input("position_ids", np.tile(np.arange(n, dtype=np.int64), (rows, 1)))
        for o in self.small:
            io.bind_output(o.name, "cpu")
        self.session.run_with_iobinding(io)
        token = self.tokens(io.copy_outputs_to_cpu()[len(self.pairs)])  # the presents were bound first
        yield token
        io = self.binding()  # a fresh binding for the one-position calls
        x, position = np.zeros((rows, 1), np.int64), np.zeros((rows, 1), np.int64)
        ones = np.ones((rows, CAPACITY), np.int64)
        io.bind_input("input_ids", "cpu", 0, np.int64, [rows, 1], x.ctypes.data)
        if "position_ids" in self.inputs:
            io.bind_input("position_ids", "cpu", 0, np.int64, [rows, 1], position.ctypes.data)
        fixed = []
        for o in self.small:
            shape = [rows if k == 0 else (d if isinstance(d, int) else 1) for k, d in enumerate(o.shape)]
            array = np.zeros(shape, np.int64 if "int64" in o.type else np.float32)
            io.bind_output(o.name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            fixed.append(array)
        while True:
            x[:, 0], position[:, 0] = token, n
            io.bind_cpu_input("attention_mask", ones[:, : n + 1])
            self.session.run_with_iobinding(io)
            n += 1
            token = self.tokens(fixed[0])
            yield token


def engine_against_loop(artifact: str, rounds: int, rows: int = 1) -> None:
    """eec's full-mode `Engine.step` over ``rows`` requests and the minimal loop over as many rows of
    the same session, a step of each in turn (which goes first alternates by round): medians of
    per-step time ratios. Row r's prompt is the poem prompt's ids plus r (modulo the vocabulary):
    prompts of one length, each row its own tokens."""
    from eec.runtime import load
    from eec.runtime.engine import Engine
    from eec.runtime.kv import PLAIN

    model = load(artifact, threads=2)
    if len(model.manifest.segments) != 1:
        raise SystemExit("--engine takes an artifact of one segment (eec compile --exits none)")
    session = Engine(model, max_batch=rows, early_exit=False).batch.kv[0].graphs[PLAIN].session
    vocab = model.manifest.model.vocab_size
    prompts = [[(i + r) % vocab for i in PROMPT] for r in range(rows)]
    loop = Graph(str(Path(artifact) / model.manifest.segments[0].file), None, session)
    ratios, eec_us, loop_us = [], [], []
    for r in range(rounds + 1):  # the first round warms up
        engine = Engine(model, max_batch=rows, early_exit=False, capacity=64 + TOKENS)
        requests = [engine.submit(p, mode="full", max_new_tokens=TOKENS, ignore_eos=True) for p in prompts]
        engine.step()  # every prompt's prefill, together
        steps = loop.steps(prompts)
        tokens = [next(steps)]
        times: dict[str, list[int]] = {"eec": [], "loop": []}
        pair = [("eec", engine.step), ("loop", lambda: tokens.append(next(steps)))]
        for _ in range(TOKENS - 1):
            for name, step in pair if r % 2 else pair[::-1]:
                start = time.perf_counter_ns()
                step()
                times[name].append(time.perf_counter_ns() - start)
        looped = np.stack(tokens, axis=1)
        for k, request in enumerate(requests):  # the same graph from the same prompt: the same greedy tokens
            if request.tokens != looped[k].tolist():
                raise SystemExit(f"row {k}: eec and the loop decoded different tokens: {request.tokens[:8]} "
                                 f"against {looped[k, :8].tolist()}")
        if r:
            ratios.append(statistics.median([a / b for a, b in zip(times["eec"], times["loop"])]))
            eec_us.append(statistics.median(times["eec"]) / 1e3)
            loop_us.append(statistics.median(times["loop"]) / 1e3)
    # Whichever runs first in a pair pays for the other's call having just streamed the weights: the
    # two orders alternate by round, and the figure is the mean of each order's median.
    first, second = statistics.median(ratios[0::2]), statistics.median(ratios[1::2])
    print(f"{rows} row{'s' if rows > 1 else ''}: eec Engine.step {statistics.median(eec_us):.0f} µs, minimal loop "
          f"{statistics.median(loop_us):.0f} µs a step (one session); eec / loop time: {(first + second) / 2:.4f} "
          f"(eec first {first:.3f}, the loop first {second:.3f}; rounds {', '.join(f'{x:.3f}' for x in ratios)})")


def main() -> None:
    if sys.argv[1] == "--engine":
        rows = 1
        if "--batch" in sys.argv:
            at = sys.argv.index("--batch")
            rows = int(sys.argv[at + 1])
            del sys.argv[at: at + 2]
        engine_against_loop(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 8, rows)
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
