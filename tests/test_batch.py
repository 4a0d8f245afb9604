"""Many sequences at once: each row of a batch gets exactly what it gets alone, and transformers' greedy
tokens in full mode; rows leave at their own exits and their KV stays the full model's."""

import dataclasses
import math
import threading

import numpy as np
import pytest

from eec.errors import InputError
from eec.runtime import load
from eec.runtime.engine import Engine
from tests.reference import hf_forward, hf_greedy

PROMPTS = [[3, 17, 42, 8, 91, 5], [60], list(range(10, 40)), [7, 7, 9], [50, 2, 33, 81, 4, 4, 19, 23, 11, 0, 1]]


def alone(model, prompts, **options):
    return [model.generate(p, **options) for p in prompts]


def same(a, b):
    return [(r.tokens, r.exits) for r in a] == [(r.tokens, r.exits) for r in b]


def test_batched_full_mode_is_each_sequence_alone_and_transformers(tiny_compiled):
    model = load(tiny_compiled.artifact)
    want = [hf_greedy(tiny_compiled.hf, p, 16) for p in PROMPTS]
    solo = alone(model, PROMPTS, mode="full", max_new_tokens=16)
    assert [r.tokens for r in solo] == want
    for max_batch in (2, 3, 5):  # rows refilled as others finish (2, 3), or all at once (5)
        batched = model.generate(PROMPTS, mode="full", max_new_tokens=16, max_batch=max_batch)
        assert same(batched, solo), max_batch
        assert all(r.finish_reason == "length" and r.stats.new_tokens == 16 for r in batched)


@pytest.mark.parametrize("threshold", [0.25, 0.5])
def test_batched_early_exit_gives_each_row_its_own_tokens_and_exits(tiny_compiled, threshold):
    model = load(tiny_compiled.artifact)
    n = tiny_compiled.hf.config.num_hidden_layers
    solo = alone(model, PROMPTS, thresholds=threshold, max_new_tokens=20)
    exits = {e for r in solo for e in r.exits}
    assert len(exits) >= 2 and n in exits, f"the rows must exit at several depths, got {exits}"
    for max_batch in (1, 2, 4, 5):
        assert same(model.generate(PROMPTS, thresholds=threshold, max_new_tokens=20, max_batch=max_batch), solo)


def test_infinite_thresholds_in_a_batch(tiny_compiled):
    model = load(tiny_compiled.artifact)
    n, first = tiny_compiled.hf.config.num_hidden_layers, tiny_compiled.exits[0]
    full = model.generate(PROMPTS, mode="full", max_new_tokens=12)
    never = model.generate(PROMPTS, thresholds=math.inf, max_new_tokens=12)
    assert same(never, full)
    always = model.generate(PROMPTS, thresholds=-math.inf, max_new_tokens=12)
    assert same(always, alone(model, PROMPTS, thresholds=-math.inf, max_new_tokens=12))
    assert all(r.exits == [n] + [first] * 11 for r in always)  # the prompt runs every layer, then the first exit


def test_rows_kv_after_exits_is_the_full_models(llama_compiled):
    """Decode three rows together with exits, then compare every row's KV at every layer with
    transformers' cache for that row's own sequence (positions still pending excepted)."""
    hf, model = llama_compiled.hf, load(llama_compiled.artifact)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    batch = model.new_batch(rows=3, capacity=8)  # the buffers grow on the way
    results = batch.prefill([0, 1, 2], prompts)
    sequences = [list(p) for p in prompts]
    deep = {0: 0, 1: 0, 2: 0}
    thresholds = {e: 0.3 for e in llama_compiled.exits}
    for _ in range(16):
        tokens = [r.token for r in results]
        for i, t in enumerate(tokens):
            sequences[i].append(t)
        results = batch.step([0, 1, 2], [[t] for t in tokens], thresholds)
        for i, r in enumerate(results):
            deep[i] += r.exit_layer == hf.config.num_hidden_layers
    assert all(v >= 2 for v in deep.values()), deep  # every row caught up at least once
    for i, sequence in enumerate(sequences):
        assert_kv_is_transformers(hf, batch, i, sequence)


def assert_kv_is_transformers(hf, batch, slot, sequence):
    """Every segment's KV of row ``slot`` against transformers' cache for ``sequence`` (positions still
    pending excepted; a segment holds or has pending what the one before it holds)."""
    cache = hf_forward(hf, sequence).past_key_values
    covered = len(sequence)
    for spec, kv in zip(batch.specs, batch.kv):
        pending = 0 if kv.pending[slot] is None else len(kv.pending[slot])
        assert kv.lengths[slot] + pending == covered, (slot, spec.start)
        covered = kv.lengths[slot]
        for j, layer in enumerate(range(spec.start, spec.stop)):
            np.testing.assert_allclose(kv.kv_of(slot)[2 * j], cache.layers[layer].keys[:, :, :covered].numpy(),
                                       atol=2e-4, rtol=1e-4)
            np.testing.assert_allclose(kv.kv_of(slot)[2 * j + 1], cache.layers[layer].values[:, :, :covered].numpy(),
                                       atol=2e-4, rtol=1e-4)


def test_exited_rows_ride_the_deeper_rows_calls(llama_compiled):
    """Row 0 always leaves at the first exit while row 1 runs every layer: row 0's position rides row
    1's call at every deeper segment, so after each step it owes no segment anything, its KV is
    transformers' at every layer, and the monitor judges each of its exited tokens on the spot
    (against transformers' own prediction at that position)."""
    hf, model = llama_compiled.hf, load(llama_compiled.artifact)
    n, first = hf.config.num_hidden_layers, llama_compiled.exits[0]
    prompts = [PROMPTS[0], PROMPTS[3]]
    batch = model.new_batch(rows=2, capacity=8, monitor=True)
    results = batch.prefill([0, 1], prompts)
    sequences = [list(p) for p in prompts]
    steps, exited = 10, []
    for _ in range(steps):
        for sequence, r in zip(sequences, results):
            sequence.append(r.token)
        results = batch.step([0, 1], [s[-1:] for s in sequences], [{first: -math.inf}, None])
        assert [r.exit_layer for r in results] == [first, n]
        assert all(kv.pending[0] is None for kv in batch.kv)
        exited.append(results[0].token)
    for i in (0, 1):
        assert_kv_is_transformers(hf, batch, i, sequences[i])
    full = hf_forward(hf, sequences[0]).logits[0].argmax(-1).tolist()  # the full model's token at each position
    start = len(prompts[0])  # the first step fed the prompt's next position
    assert int(batch.checked[0]) == steps
    assert int(batch.agreed[0]) == sum(full[start + k] == t for k, t in enumerate(exited))
    # When no row goes deeper, nothing rides: the deeper segments do not run and the positions wait.
    fed = [batch.length(0), batch.length(1)]
    for k in range(1, 4):
        results = batch.step([0, 1], [[r.token] for r in results], [{first: -math.inf}, {first: -math.inf}])
        assert [batch.kv[1].lengths[i] for i in (0, 1)] == fed and all(len(batch.kv[1].pending[i]) == k for i in (0, 1))


def test_requests_submitted_while_others_decode(llama_compiled):
    model = load(llama_compiled.artifact)
    options = dict(thresholds=0.4, max_new_tokens=10)
    solo = alone(model, PROMPTS, **options)
    engine = Engine(model, max_batch=3)
    first = [engine.submit(p, **options) for p in PROMPTS[:2]]
    for _ in range(4):
        engine.step()
    assert all(len(r.tokens) == 4 for r in first)  # decoding when the next ones arrive
    later = [engine.submit(p, **options) for p in PROMPTS[2:]]
    engine.run()
    assert same([r.result() for r in first + later], solo)


def test_cancelled_requests_leave_and_the_others_are_untouched(llama_compiled):
    """A running request cancelled mid-way and a waiting one cancelled before it starts both finish as
    "cancelled", free their rows, and the rows that share the batch decode what they decode alone; a
    full queue refuses the next request."""
    from eec.errors import Overloaded

    model = load(llama_compiled.artifact)
    options = dict(thresholds=0.4, max_new_tokens=12)
    solo = alone(model, PROMPTS, **options)
    engine = Engine(model, max_batch=2, max_waiting=5)
    requests = [engine.submit(p, **options) for p in PROMPTS[:5]]  # all waiting until the first step
    with pytest.raises(Overloaded, match="waiting"):
        engine.submit(PROMPTS[0], **options)
    for _ in range(3):
        engine.step()
    requests[0].cancel()  # running
    requests[3].cancel()  # waiting
    engine.step()
    assert engine.live == 2 and engine.waiting == 1  # prompt 2 took the freed row, prompt 4 waits
    engine.run()
    assert [r.finish_reason for r in (requests[0], requests[3])] == ["cancelled", "cancelled"]
    assert len(requests[0].tokens) == 3 and requests[3].tokens == []
    kept = [1, 2, 4]
    assert same([requests[i].result() for i in kept], [solo[i] for i in kept])


def test_eight_threads_two_hundred_requests(llama_compiled):
    model = load(llama_compiled.artifact)
    options = dict(thresholds=0.4, max_new_tokens=5)
    prompts = [[(7 * i + k) % 96 for k in range(1 + i % 9)] for i in range(25)]
    want = {tuple(p): (r.tokens, r.exits) for p, r in zip(prompts, alone(model, prompts, **options))}
    got, errors = [], []
    with Engine(model, max_batch=6) as engine:
        def client(t):
            try:
                requests = [(prompts[(t + 8 * k) % 25], engine.submit(prompts[(t + 8 * k) % 25], **options))
                            for k in range(25)]
                got.extend((tuple(p), r.result(timeout=120)) for p, r in requests)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(got) == 200
    assert all((r.tokens, r.exits) == want[p] for p, r in got)


def test_finish_at_eos_and_at_the_context(llama_compiled):
    model = load(llama_compiled.artifact)
    free = model.generate(PROMPTS, mode="full", max_new_tokens=12)
    eos = free[0].tokens[5]  # pretend the sixth token of the first row is the end of sequence
    model.manifest = dataclasses.replace(model.manifest, eos_token_ids=[eos])
    stopped = model.generate(PROMPTS, mode="full", max_new_tokens=12)
    for f, s in zip(free, stopped):
        cut = f.tokens.index(eos) + 1 if eos in f.tokens else len(f.tokens)
        assert s.tokens == f.tokens[:cut]
        assert s.finish_reason == ("stop" if eos in f.tokens else "length")
    context = model.manifest.model.context_length
    long = list(range(90)) + list(range(context - 93))  # 3 positions short of the context
    near = model.generate([long, PROMPTS[1]], mode="full", max_new_tokens=10, ignore_eos=True)
    assert len(near[0].tokens) == 3 and near[0].finish_reason == "length"
    assert near[0].tokens == model.generate(long, mode="full", max_new_tokens=10, ignore_eos=True).tokens
    assert len(near[1].tokens) == 10


def test_streamed_batch_events_make_the_results(llama_compiled):
    model = load(llama_compiled.artifact)
    results = model.generate(PROMPTS, thresholds=0.4, max_new_tokens=8, max_batch=2)
    events = list(model.generate(PROMPTS, thresholds=0.4, max_new_tokens=8, max_batch=2, stream=True))
    for i, r in enumerate(results):
        mine = [e for e in events if e.index == i]
        assert [e.token for e in mine] == r.tokens and [e.exit_layer for e in mine] == r.exits
        assert [e.finish_reason for e in mine] == [None] * 7 + ["length"]


@pytest.mark.parametrize("prompts, message", [
    ([], "the list is empty"),
    ([[1, 2], [1.7, 2.9]], "whole numbers"),
    ([[1, 2], [True]], "whole numbers"),
    (b"\xff\xfe", "not bytes"),
    ([[1, 2], [96]], "0..95"),
    ([[1, 2], [-1]], "0..95"),
    ([[1, 2], list(range(96)) * 2], "context"),
    ([[1, 2], 3.5], "not float"),
    ([[1, 2], "text"], "no tokenizer"),
])
def test_bad_prompts_are_refused_before_anything_runs(llama_compiled, prompts, message):
    model = load(llama_compiled.artifact)
    with pytest.raises(InputError, match=message):
        model.generate(prompts, max_new_tokens=4)


@pytest.mark.parametrize("options, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_batch=0), "max_batch"),
    (dict(stop="x"), "tokenizer"),
    (dict(stop=[""]), "stop"),
    (dict(mode="speculative", stream=True), "one sequence"),
])
def test_bad_options_are_refused(llama_compiled, options, message):
    model = load(llama_compiled.artifact)
    with pytest.raises(InputError, match=message):
        model.generate([PROMPTS[0], PROMPTS[1]], **options)


def test_kv_is_appended_in_place(llama_compiled):
    """Shared KV: onnxruntime writes each step's keys and values straight into the cache buffers (the
    present outputs' storage is the buffer's rows the call covers), the buffers are never replaced
    while they have room, and what lands there is transformers' cache for each row's sequence."""
    from eec.runtime.kv import PLAIN

    model = load(llama_compiled.artifact)
    batch = model.new_batch(rows=3, capacity=64, early_exit=False)
    prompts = PROMPTS[:3]
    results = batch.prefill([0, 1, 2], prompts)
    buffers = [[(id(b), b.ctypes.data) for b in kv.buffers] for kv in batch.kv]
    sequences = [list(p) for p in prompts]
    for _ in range(6):
        for seq, r in zip(sequences, results):
            seq.append(r.token)
        results = batch.step([0, 1, 2], [[r.token] for r in results])
        for kv in batch.kv:
            assert kv.shared and kv.generation == 0
            graph = kv.graphs[PLAIN]
            first, end, _ = graph.span
            values = graph.outputs()
            presents = [values[k] for k in range(graph.small, len(values))]
            stride = kv.buffers[0].strides[0]
            assert [p.data_ptr() for p in presents] == [b.ctypes.data + first * stride for b in kv.buffers]
            assert end - first == 3
    assert [[(id(b), b.ctypes.data) for b in kv.buffers] for kv in batch.kv] == buffers
    for slot, seq in enumerate(sequences):
        cache = hf_forward(llama_compiled.hf, seq).past_key_values
        for kv in batch.kv:
            assert kv.lengths[slot] == len(seq)
            for i, layer in enumerate(range(kv.spec.start, kv.spec.stop)):
                np.testing.assert_allclose(kv.buffers[2 * i][slot, :, : len(seq)], cache.layers[layer].keys[0].numpy(),
                                           atol=2e-4, rtol=1e-4)
                np.testing.assert_allclose(kv.buffers[2 * i + 1][slot, :, : len(seq)],
                                           cache.layers[layer].values[0].numpy(), atol=2e-4, rtol=1e-4)


def test_full_mode_step_across_idle_rows_refills_and_growth(llama_compiled):
    """Full mode's own step (`Batch.full`): three rows decoded together, then two with the middle
    slot idle (its block gets a dummy position it must forget), then a slot released and refilled
    with a longer prompt, the buffers growing on the way: every row's tokens are transformers'
    greedy ones for its sequence and its KV is transformers' cache (a row's mask bound once at the
    buffers' width must follow its own length through all of it)."""
    hf, model = llama_compiled.hf, load(llama_compiled.artifact)
    batch = model.new_batch(rows=3, capacity=8, early_exit=False)
    prompts = {0: PROMPTS[0], 1: PROMPTS[1], 2: PROMPTS[3]}
    sequences = {s: list(p) for s, p in prompts.items()}
    for slot, r in zip(prompts, batch.prefill(list(prompts), list(prompts.values()))):
        sequences[slot].append(r.token)

    def steps(slots, n):
        for _ in range(n):
            tokens, _, _ = batch.full(slots, [sequences[s][-1] for s in slots])
            for s, t in zip(slots, tokens.tolist()):
                sequences[s].append(t)

    steps([0, 1, 2], 4)
    steps([0, 2], 3)  # one call over slots 0..2, slot 1 taking no part
    steps([1], 2)
    steps([0], 2)  # one row alone: its mask row is the one bound at the buffers' width
    batch.release(0)
    prompts[0], sequences[0] = PROMPTS[4], list(PROMPTS[4])  # shorter than what slot 0 held: its mask row is rewritten
    sequences[0].append(batch.prefill([0], [prompts[0]])[0].token)
    steps([0], 2)
    steps([0, 1, 2], 5)
    assert batch.kv[0].generation > 0, "the buffers never grew"
    for slot, prompt in prompts.items():
        new = len(sequences[slot]) - len(prompt)
        assert sequences[slot][len(prompt):] == hf_greedy(hf, prompt, new), slot
        assert_kv_is_transformers(hf, batch, slot, sequences[slot][:-1])  # the last token is not fed yet


def test_one_engine_serves_full_and_early_exit_requests(tiny_compiled, monkeypatch):
    """Rows in full mode and rows with exits in one engine: each request gets what it gets alone. Steps
    with an early-exit row run early exit's step; once only full-mode rows are left, full mode's own."""
    from eec.runtime.core import Batch

    model = load(tiny_compiled.artifact)
    n = tiny_compiled.hf.config.num_hidden_layers
    asks = [dict(mode="full", max_new_tokens=14), dict(thresholds=0.25, max_new_tokens=6)] * 2 + [
        dict(mode="full", max_new_tokens=9)]
    solo = [model.generate(p, **a) for p, a in zip(PROMPTS, asks)]
    assert any(e < n for r in solo[1::2] for e in r.exits), "the early-exit requests must leave early"
    calls = {"full": 0, "early": 0}
    for name in calls:
        method = getattr(Batch, name)
        monkeypatch.setattr(Batch, name, lambda self, *a, _m=method, _n=name, **k: (
            calls.__setitem__(_n, calls[_n] + 1), _m(self, *a, **k))[1])
    engine = Engine(model, max_batch=3)
    requests = [engine.submit(p, **a) for p, a in zip(PROMPTS, asks)]
    engine.run()
    assert same([r.result() for r in requests], solo)
    assert calls["full"] > 0 and calls["early"] > 0, calls


def test_pending_positions_survive_a_row_move_and_the_next_sequence(llama_compiled):
    """A row that keeps leaving at the first exit queues a position a token for the deeper segments
    (appended into a buffer of its own). Moved to another slot (as the engine keeps rows together) with
    its positions still queued, while a new sequence in its old slot queues its own: once the moved row
    goes deep, its KV at every layer is transformers' for its sequence, and so is the new row's."""
    hf, model = llama_compiled.hf, load(llama_compiled.artifact)
    first = llama_compiled.exits[0]
    batch = model.new_batch(rows=2, capacity=8)
    sequences = {1: list(PROMPTS[0])}
    sequences[1].append(batch.prefill([1], [PROMPTS[0]])[0].token)

    def steps(slot, n, thresholds):
        for _ in range(n):
            sequences[slot].append(batch.step([slot], [sequences[slot][-1:]], thresholds)[0].token)

    steps(1, 20, {first: -math.inf})  # every token leaves at the first exit: 20 positions queued deeper
    assert len(batch.kv[1].pending[1]) == 20
    batch.move(1, 0)
    sequences[0] = sequences.pop(1)
    sequences[1] = list(PROMPTS[3])
    sequences[1].append(batch.prefill([1], [PROMPTS[3]])[0].token)
    steps(1, 12, {first: -math.inf})  # the new sequence queues its own positions in slot 1
    steps(0, 1, None)  # the moved row goes deep: its 20 queued positions catch up
    steps(1, 1, None)
    for slot in (0, 1):
        assert all(kv.pending[slot] is None for kv in batch.kv)
        assert_kv_is_transformers(hf, batch, slot, sequences[slot][:-1])


def test_early_exit_step_is_the_general_steps(tiny_compiled):
    """Early exit's own step (`Batch.early`, arrays) against the general `Batch.step` (per-row
    bookkeeping), each on a batch of its own, fed the same tokens: every step gives the same token and
    exit for every row, the same top tokens and logits for the rows that sample (every other step),
    and afterwards every row's KV and pending positions are the same. Rows with exits at each depth,
    a row in full mode, one that does not ask the first exit, and an idle slot between rows (so the
    first call spans a dummy row); then every row leaves at the first exit for a while (the step ends
    there, the positions queue), then the mixed rows again (they catch up)."""
    model = load(tiny_compiled.artifact)
    first, second = tiny_compiled.exits
    n = tiny_compiled.hf.config.num_hidden_layers
    mixed = {0: {first: 0.3, second: 0.3}, 2: {first: 0.5, second: 0.2}, 3: None, 4: {second: 0.25},
             5: {first: -math.inf}}
    slots = sorted(mixed)
    fast, general = (model.new_batch(rows=6, capacity=8) for _ in range(2))
    assert fast.can_exit_early and fast.can_sample_early
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(len(slots))]
    tokens = [r.token for r in fast.prefill(slots, prompts)]
    assert tokens == [r.token for r in general.prefill(slots, prompts)]
    seen = set()
    for step in range(24):
        thresholds = [{first: -math.inf} if 8 <= step < 16 else mixed[s] for s in slots]
        sample = [True, False, True, False, True] if step % 2 else None
        got_tokens, got_layers, tops = fast.early(slots, tokens, thresholds, 0, sample)
        want = general.step(slots, [[t] for t in tokens], thresholds, 0, sample=sample or False)
        assert got_tokens.tolist() == [r.token for r in want], step
        assert got_layers.tolist() == [r.exit_layer for r in want], step
        if sample is None:
            assert tops is None
        for r, result in enumerate(want if sample else []):
            if not sample[r]:
                assert tops[r] is None
                continue
            np.testing.assert_array_equal(tops[r][0], result.top_ids)
            np.testing.assert_allclose(tops[r][1], result.top_logits, rtol=1e-6, atol=1e-6)
        seen.update(got_layers.tolist())
        tokens = got_tokens.tolist()
    assert seen == {first, second, n}, seen
    assert_same_rows(fast, general, slots)


def assert_same_rows(a, b, slots):
    """Every segment of batches ``a`` and ``b`` holds the same lengths, pending positions and KV for ``slots``."""
    for x, y in zip(a.kv, b.kv):
        assert x.lengths.tolist() == y.lengths.tolist()
        for s in slots:
            assert (x.pending[s] is None) == (y.pending[s] is None), s
            if x.pending[s] is not None:
                np.testing.assert_array_equal(x.pending[s], y.pending[s])
            for p, q in zip(x.kv_of(s), y.kv_of(s)):
                np.testing.assert_allclose(p, q, atol=1e-5, rtol=1e-5)


def test_early_exit_step_of_one_row_is_the_general_steps(tiny_compiled):
    """One greedy row (`Batch.early`'s scalar path) against the general step: the same token and exit
    every step, tokens leaving at the first exit and going deeper, and the same KV and pending
    positions afterwards."""
    model = load(tiny_compiled.artifact)
    first, second = tiny_compiled.exits
    fast, general = (model.new_batch(rows=2, capacity=8) for _ in range(2))
    token = fast.prefill([1], [PROMPTS[0]])[0].token
    assert token == general.prefill([1], [PROMPTS[0]])[0].token
    seen = set()
    for step in range(24):
        thresholds = [{first: -math.inf} if 8 <= step < 14 else {first: 0.4, second: 0.3}]
        got_tokens, got_layers, _ = fast.early([1], [token], thresholds, 0)
        want = general.step([1], [[token]], thresholds, 0)[0]
        assert (got_tokens[0], got_layers[0]) == (want.token, want.exit_layer), step
        seen.add(got_layers[0])
        token = got_tokens[0]
    assert first in seen and len(seen) >= 2, seen
    assert_same_rows(fast, general, [1])


def test_sampled_and_greedy_rows_in_early_exits_step(tiny_compiled, monkeypatch):
    """Seeded sampled requests beside greedy ones, through the engine: with early exit's own step
    serving them all, each request gets what the general step gives it (the same draws from the same
    deciding heads' top tokens), and early exit's step did run."""
    from eec.runtime.core import Batch

    model = load(tiny_compiled.artifact)
    asks = [dict(thresholds=0.3, temperature=0.8, seed=s, max_new_tokens=12) for s in (1, 2, 3)] + [
        dict(thresholds=0.3, max_new_tokens=12)] * 2

    def run(sample_early):
        engine = Engine(model, max_batch=3)
        engine._sample_early = sample_early
        requests = [engine.submit(p, **a) for p, a in zip(PROMPTS, asks)]
        engine.run()
        return [r.result() for r in requests]

    calls = []
    early = Batch.early
    monkeypatch.setattr(Batch, "early", lambda self, *a: calls.append(a[-1]) or early(self, *a))
    general = run(False)
    assert all(sample is None for sample in calls)  # greedy-only steps still take it: none sampled
    calls.clear()
    got = run(True)
    assert any(sample is not None and any(sample) for sample in calls)
    assert same(got, general)
    n = tiny_compiled.hf.config.num_hidden_layers
    assert any(e < n for r in got[:3] for e in r.exits), "the sampled rows must leave early too"


def test_pending_store_against_a_list_per_row():
    """`Pending` (one store for every row, counts) against plain Python lists of positions per row,
    through a random sequence of its operations: appends of several positions, one position for
    several rows at once, growth past the first capacity, a row moved, a row forgotten, a queue set
    from outside (copied, even from the store's own view), and positions of another shape refused
    while any row holds some."""
    from eec.runtime.kv import Pending

    rng = np.random.default_rng(0)
    pending, reference = Pending(5), [[] for _ in range(5)]

    def check():
        for slot, want in enumerate(reference):
            got = pending[slot]
            assert (got is None) == (not want), slot
            if want:
                np.testing.assert_array_equal(got, np.stack(want))

    for _ in range(300):
        op = int(rng.choice([0, 0, 0, 1, 1, 1, 2, 3, 4]))  # mostly appends: the store must grow
        slot, other = (int(s) for s in rng.choice(5, size=2, replace=False))
        if op == 0:
            rows = rng.normal(size=(int(rng.integers(1, 5)), 3)).astype(np.float32)
            pending.add(slot, rows)
            reference[slot] += list(rows)
        elif op == 1:
            slots = np.sort(rng.choice(5, size=int(rng.integers(1, 6)), replace=False))
            rows = rng.normal(size=(len(slots), 3)).astype(np.float32)
            pending.add_rows(slots, rows)
            for s, row in zip(slots, rows):
                reference[s].append(row)
        elif op == 2:
            pending.move(slot, other)
            reference[other], reference[slot] = reference[slot], []
        elif op == 3:
            pending[slot] = None
            reference[slot] = []
        elif op == 4 and reference[other]:
            pending[slot] = pending[other]  # a view of the store itself
            reference[slot] = list(reference[other])
        check()
    assert pending.store.shape[1] > 16  # it grew on the way
    if not any(reference):
        pending.add(0, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="cannot join"):
        pending.add(0, np.zeros((1, 4), np.float32))
