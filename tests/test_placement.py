"""Exit placement on synthetic traces and latency tables where the best set is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from eec.calib.metrics import ALL_METRICS
from eec.calib.traces import Traces
from eec.errors import InputError
from eec.targets.latency import LatencyTable, ModelShape, fit_host, load_profile, model_table
from eec.targets.placement import (TOLERANCE, cost_breakdown, describe, expected_cost, place_exits,
                                  speculative_breakdown)
from eec.targets.profiles import get_target
from eec.targets.replay import replay_cost

SHAPE = ModelShape("llama", 12, 64, 128, 4, 2, 16, 1000)
METRIC = ALL_METRICS[0]


def table(layer_s: float, head_s: float, overhead: float = 0.0, marginal: float = 0.0) -> LatencyTable:
    """Every layer costs layer_s per call (plus marginal per extra token); every head head_s."""
    layer = [layer_s + marginal * (s - 1) for s in range(1, 9)]
    return LatencyTable(SHAPE, "fp32", "test", "model", overhead, layer=layer, final_head=0.0,
                        heads={3: head_s, 6: head_s, 9: head_s})


def traces(confident: dict[int, float], n: int = 2000, seed: int = 0) -> Traces:
    """Exit layer -> share of tokens that are confident (score 1) and agree there; the rest score 0 and disagree."""
    rng = np.random.default_rng(seed)
    layers = sorted(confident)
    scores = np.zeros((n, len(layers), len(ALL_METRICS)), dtype=np.float32)
    agreed = np.zeros((n, len(layers)), dtype=bool)
    for k, layer in enumerate(layers):
        hit = rng.random(n) < confident[layer]
        scores[hit, k, :] = 1.0
        agreed[hit, k] = True
    return Traces(layers, scores, agreed, np.arange(n) % 40)


def test_hand_computed_cost():
    t = table(layer_s=1.0, head_s=2.0, marginal=0.5)
    # exits (3,): 60 tokens leave at 3, 40 reach 12.
    # leave at 3: 3 layers + head 2 + catch-up of the [3,12) segment: 9 layers * 0.5 = 4.5 -> 9.5
    # reach 12: 12 layers + head 2 -> 14
    assert expected_cost(t, (3,), {3: 60, 12: 40}) == pytest.approx((60 * 9.5 + 40 * 14) / 100)
    parts = cost_breakdown(t, (3,), {3: 60, 12: 40})
    assert parts["heads"] == pytest.approx(2.0)  # every token passes the exit's head
    assert parts["catch_up"] == pytest.approx(0.6 * 4.5)
    assert parts["segments"] == pytest.approx(0.6 * 3 + 0.4 * 12)


def test_a_head_inside_its_segment_costs_what_it_adds_to_the_call():
    t = LatencyTable(SHAPE, "fp32", "test", "measured", 0.0,
                     segments={(0, 3): [3.0] * 8, (3, 12): [9.0] * 8}, heads={3: 2.0})
    assert cost_breakdown(t, (3,), {3: 60, 12: 40})["heads"] == pytest.approx(2.0)  # the head as its own call
    t.with_head = {(0, 3): 3.5}  # the segment with its head inside: 0.5 more than without
    parts = cost_breakdown(t, (3,), {3: 60, 12: 40})
    assert parts["heads"] == pytest.approx(0.5) and parts["segments"] == pytest.approx(0.6 * 3 + 0.4 * 12)
    assert cost_breakdown(t, (3,), {3: 60, 12: 40}, gated=True)["heads"] == pytest.approx(0.6 * 2.0)  # classifiers: apart
    assert t.with_head_fraction(0.5).exit_cost(0, 3) == pytest.approx(0.25)  # a shortlist scales it
    assert LatencyTable.from_json(t.to_json()).with_head == {(0, 3): 3.5}


def test_hand_computed_catch_up_from_long_calls():
    # A 9-layer range [3, 12) measured at 1..8 positions: 10 at one, 16 at two, then 1 a position
    # (a vector product becomes a matrix product between 1 and 2 positions).
    t = LatencyTable(SHAPE, "fp32", "test", "measured", 0.0,
                     segments={(0, 3): [3.0 + 0.1 * (s - 1) for s in range(1, 9)],
                               (3, 12): [10.0, *[16.0 + (s - 2) for s in range(2, 9)]]}, heads={3: 2.0})
    # 90 leave at 3, 10 reach 12: each exited position costs the slope 1 later; each of the 10 deep
    # calls carries exited positions and pays the step beyond the slope, 16 - 10 - 1 = 5, once.
    parts = cost_breakdown(t, (3,), {3: 90, 12: 10})
    assert parts["catch_up"] == pytest.approx((90 * 1.0 + 10 * 5.0) / 100)
    # With few exits (10 leave, 90 go deep), only 10 calls can carry exited positions.
    parts = cost_breakdown(t, (3,), {3: 10, 12: 90})
    assert parts["catch_up"] == pytest.approx((10 * 1.0 + 10 * 5.0) / 100)


def test_hand_computed_cost_with_propagated_catch_up():
    t = table(layer_s=1.0, head_s=2.0, marginal=0.5)
    # Fill graphs of the ranges after exit 3, measured at 1..8 positions: 1.0 fixed + 0.25 a position
    # over [3, 12) as one graph, or over its two parts (the call overhead of 0.1 saved once).
    t.fills = {(3, 12): [1.0 + 0.25 * s for s in range(1, 9)], (3, 6): [0.6 + 0.1 * s for s in range(1, 9)],
               (6, 12): [0.5 + 0.15 * s for s in range(1, 9)]}
    t.call_overhead = 0.1
    assert t.fill_costs(3, 12) == pytest.approx((1.0, 0.25))
    assert t.fill_costs(0, 12) is None  # no fill graph starts at layer 0
    # exits (3,): 60 leave at 3 and each costs 0.25 of fill later (not 9 * 0.5 of exact catch-up);
    # the 40 that reach layer 12 pay the fill call's fixed 1.0 first.
    parts = cost_breakdown(t, (3,), {3: 60, 12: 40}, propagate=True)
    assert parts["catch_up"] == pytest.approx((60 * 0.25 + 40 * 1.0) / 100)
    assert parts["segments"] == pytest.approx(0.6 * 3.1 + 0.4 * 12.2)  # each segment call pays the 0.1 overhead
    assert cost_breakdown(t, (3,), {3: 60, 12: 40})["catch_up"] == pytest.approx(0.6 * 4.5)  # exact, as before
    # Cut at 3 and 6 with exits at both: 6's range [6, 12) is one fill graph, [3, 6) another.
    parts = cost_breakdown(t, (3, 6), {3: 50, 6: 30, 12: 20}, propagate=True)
    # [3, 6): 0.6 fixed + 0.1 a position; [6, 12): 0.5 + 0.15. Per position, then the fixed parts:
    want = 50 * (0.1 + 0.15) + 30 * 0.15 + (30 + 20) * 0.6 + 20 * 0.5
    assert parts["catch_up"] == pytest.approx(want / 100)
    # Ranges without fill graphs fall back to the exact catch-up.
    t.fills = {}
    assert cost_breakdown(t, (3,), {3: 60, 12: 40}, propagate=True)["catch_up"] == pytest.approx(0.6 * 4.5)


def test_hand_computed_speculative_cost():
    # Cut at 3 and 6, drafting at 6: a draft call runs [0, 3) and [3, 6) over one position (3 + 3.2)
    # and the head inside its segment (0.5 over the plain [3, 6) call); the verify runs [6, 12) over the drafts
    # through its verify graph: 9 + s at s positions, where the plain segment costs 8 + s.
    t = LatencyTable(SHAPE, "fp32", "test", "measured", 0.0,
                     segments={(0, 3): [3.0] * 8, (3, 6): [3.2] * 8, (6, 12): [8.0 + s for s in range(1, 9)]},
                     heads={3: 2.0, 6: 2.0}, with_head={(3, 6): 3.7}, verifies={(6, 12): [9.0 + s for s in range(1, 9)]})
    assert t.verify_cost(6, 12, 4) == pytest.approx(13.0) and t.verify_cost(3, 6, 4) == pytest.approx(3.2)
    # 10 cycles of 4 draft calls and 5 of 1, emitting 35 tokens.
    parts = speculative_breakdown(t, 6, {4: 10, 1: 5}, 35, splits=(3, 6))
    assert parts["segments"] == pytest.approx((10 * 4 + 5 * 1) * 6.2 / 35)
    assert parts["heads"] == pytest.approx((10 * 4 + 5 * 1) * 0.5 / 35)
    assert parts["catch_up"] == pytest.approx((10 * 13.0 + 5 * 10.0) / 35)
    # Drafting at 3: the draft calls stop at [0, 3) with the head as its own call; [3, 6) joins the verify.
    parts = speculative_breakdown(t, 3, {2: 10}, 20, splits=(3, 6))
    assert parts["segments"] == pytest.approx(2 * 3.0 / 2) and parts["heads"] == pytest.approx(2 * 2.0 / 2)
    assert parts["catch_up"] == pytest.approx((3.2 + 11.0) / 2)
    assert LatencyTable.from_json(t.to_json()).verifies == t.verifies
    t.verifies = {}  # not measured: the plain segment stands in
    assert t.verify_cost(6, 12, 4) == pytest.approx(12.0)


def test_measured_ranges_chain_and_fit_the_fixed_cost_of_a_call():
    from eec.targets.latency import fit_segment_overhead

    # Three one-layer segments of 10 each, and the whole range measured as one graph at 24:
    # each call beyond the first cost (30 - 24) / 2 = 3 of fixed overhead.
    segments = {(0, 1): [10.0] * 8, (1, 2): [10.0] * 8, (2, 3): [10.0] * 8, (0, 3): [24.0] * 8}
    assert fit_segment_overhead(segments) == pytest.approx(3.0)
    # Cuts of several layers work the same way (an artifact's exits against one without).
    assert fit_segment_overhead({(0, 2): [20.0], (2, 3): [10.0], (0, 3): [27.0]}) == pytest.approx(3.0)
    shape = LatencyTable(SHAPE, "fp32", "test", "measured", 0.5).shape
    t = LatencyTable(shape, "fp32", "test", "measured", 0.5, segments=segments, segment_overhead=3.0)
    assert t.range_cost(0, 3) == 24.0  # measured as one graph: used as measured
    assert t.range_cost(0, 2) == pytest.approx(17.0)  # two calls become one: one fixed cost saved
    assert t.range_cost(1, 3) == pytest.approx(17.0)
    unfitted = LatencyTable(shape, "fp32", "test", "measured", 0.5, segments={k: v for k, v in segments.items() if k != (0, 3)})
    assert fit_segment_overhead(unfitted.segments) == 0.0
    assert unfitted.range_cost(0, 3) == pytest.approx(30.0 - 2 * 0.5)  # the graph-call overhead stands in


def test_cheap_heads_and_confident_early_exit_choose_it():
    p = place_exits(traces({3: 0.0, 6: 0.8, 9: 0.1}), table(1.0, 0.5), eps=0.9, metric=METRIC, rule="valade")
    assert p.best.exits == (6,)
    assert p.best.speedup > 1.0
    assert p.ranked[0] is p.best and len(p.ranked) == 8  # every subset of three layers


def test_a_set_barely_cheaper_with_more_exits_loses_to_the_simpler_one():
    # Exit 6 alone, or 6 and 9 where a few more tokens leave at 9 for a saving under TOLERANCE.
    p = place_exits(traces({6: 0.8, 9: 0.1}), table(1.0, 0.01), eps=0.9, metric=METRIC, rule="valade")
    cheapest = min(p.ranked, key=lambda c: c.expected_s)
    assert cheapest.exits == (6, 9), "the test needs the two-exit set to be the cheapest"
    assert cheapest.expected_s > p.best.expected_s / (1 + TOLERANCE)
    assert p.best.exits == (6,) and p.ranked[0] is p.best


def test_expensive_heads_choose_no_exit():
    # A head costing eight layers (SmolLM2's full-vocabulary head) against exits that rarely fire.
    p = place_exits(traces({3: 0.05, 6: 0.1, 9: 0.3}), table(1.0, 8.0), eps=0.9, metric=METRIC, rule="valade")
    assert p.best.exits == ()
    assert p.best.speedup == pytest.approx(1.0)
    assert all(c.speedup < 1.0 for c in p.ranked[1:])


def hand_cost(exits: tuple[int, ...], exit_at: np.ndarray, head_s: float, marginal: float) -> float:
    """Mean seconds per token for `table(1.0, head_s, marginal=marginal)` on the 12-layer SHAPE, written
    out: a token leaving at exit e runs e layers (1 s each), the heads of the exits up to e, and each of
    the 12 - e later layers once more for its position in the next deep call (``marginal`` each); a
    token that leaves nowhere (``exit_at`` 12) runs 12 layers and every head."""
    costs = [e + head_s * sum(1 for x in exits if x <= e) + (12 - e) * marginal for e in exit_at]
    return float(np.mean(costs))


def test_the_best_set_is_the_hand_priced_brute_force_optimum_on_random_instances():
    """Every subset of the exits replayed and priced by hand; rule 5 picked from those prices."""
    import itertools

    from eec.calib.traces import thresholds_for

    rng = np.random.default_rng(1)
    for seed in range(5):
        conf = {3: rng.random() * 0.5, 6: rng.random() * 0.7, 9: rng.random()}
        head_s = float(rng.uniform(0.2, 4.0))
        tr = traces(conf, seed=seed)
        p = place_exits(tr, table(1.0, head_s, marginal=0.2), eps=0.9, metric=METRIC, rule="valade")
        priced = {}
        for r in range(4):
            for exits in itertools.combinations((3, 6, 9), r):
                taus = thresholds_for(tr.columns(list(exits)), 0.9, METRIC, "valade") if exits else {}
                exit_at = np.full(len(tr), 12)
                for row in range(len(tr)):
                    score = tr.scores[row, :, 0]
                    exit_at[row] = next((e for e in exits if score[tr.exits.index(e)] >= taus[e]), 12)
                priced[exits] = hand_cost(exits, exit_at, head_s, 0.2)
        assert {c.exits: c.expected_s for c in p.ranked} == pytest.approx(priced, rel=1e-9)
        cheapest = min(priced.values())
        near = [e for e, cost in priced.items() if cost <= cheapest * (1 + TOLERANCE)]
        want = min(near, key=lambda e: (len(e), priced[e]))
        assert p.best.exits == want and p.best.speedup == pytest.approx(12 / priced[want])


def test_a_batch_is_priced_call_by_call():
    """Rule 6 by hand, with every layer 1 per call plus 0.5 a row or a position beyond the first and the
    exit's head 2: the calls the engine makes for a few generations, counted out step by step."""
    t = table(layer_s=1.0, head_s=2.0, marginal=0.5)
    seg = lambda layers, n: layers * (1 + 0.5 * (n - 1))  # n rows at one position, or one row at n
    # Two rows: A leaves at 3 and B goes deep, so A's position rides B's call; then the other way
    # round; then A alone leaves and ends owing its position, which it never pays.
    step = seg(3, 2) + 2.0 + seg(9, 2)
    assert replay_cost(t, (3,), [[3, 12, 3], [12, 3]], batch=2) == pytest.approx((2 * step + seg(3, 1) + 2.0) / 5)
    assert replay_cost(t, (), [[12] * 3, [12] * 2], batch=2) == pytest.approx((2 * seg(12, 2) + seg(12, 1)) / 5)
    # Two rows leave together (nothing rides: no row goes on), then both go deep owing one position
    # each: a call of two positions each, as two calls are no more than rounds would take.
    assert replay_cost(t, (3,), [[3, 12], [3, 12]], batch=2) == pytest.approx(
        (2 * (seg(3, 2) + 2.0) + 2 * seg(9, 2)) / 4)
    # Three such rows: rounds, one position of each row a call, two calls instead of three.
    assert replay_cost(t, (3,), [[3, 12]] * 3, batch=3) == pytest.approx((2 * (seg(3, 3) + 2.0) + 2 * seg(9, 3)) / 6)
    # One row is rule 3: each exited token's catch-up at the slope, in its deep token's call.
    assert replay_cost(t, (3,), [[3, 3, 12]], batch=1) == pytest.approx(expected_cost(t, (3,), {3: 2, 12: 1}))


def test_an_exit_that_pays_alone_is_dropped_for_a_batch():
    """Exit 3 lets 58% of tokens leave: alone it pays, but at 8 rows some row passes it at 99% of
    steps, so layers 3-6 run anyway and the exit only adds its head; exit 6 alone stays."""
    t = table(1.0, 0.3, overhead=1.0, marginal=0.3)
    tr = traces({3: 0.58, 6: 0.95})
    alone = place_exits(tr, t, eps=0.9, metric=METRIC, rule="valade")
    batched = place_exits(tr, t, eps=0.9, metric=METRIC, rule="valade", batch=8)
    assert alone.best.exits == (3, 6) and batched.best.exits == (6,)
    assert batched.batch == 8 and "8 sequences at once" in describe(batched)[0]
    assert batched.full_s == pytest.approx(t.rows_cost(0, 12, 8) / 8)  # 8 rows at every step
    with pytest.raises(InputError, match="exact catch-up"):
        place_exits(tr, t, eps=0.9, metric=METRIC, rule="valade", propagate=True, batch=8)


def test_measured_rows_price_a_batch_step():
    """Where the profile timed a batch's step (`eec targets measure --batch 8`), a call over 8 rows costs
    what was measured, chained like one-row calls (the merged calls' fixed cost saved once per join);
    where it did not, one row over 8 positions stands in."""
    segments = {(0, 3): [3.0 + 0.5 * s for s in range(8)], (3, 12): [9.0 + 1.0 * s for s in range(8)]}
    t = LatencyTable(SHAPE, "fp32", "test", "measured", 0.25, segments=segments, heads={3: 2.0})
    assert t.rows_cost(0, 12, 8) == pytest.approx(6.5 + 16.0 - 0.25)  # no rows measured: 8 positions of one row
    t.rows = {(0, 3): {8: 10.0}, (3, 12): {8: 30.0}}
    assert t.has_rows(0, 12, 8) and not t.has_rows(0, 12, 4)
    assert t.rows_cost(0, 3, 8) == 10.0 and t.rows_cost(3, 12, 8) == 30.0
    assert t.rows_cost(0, 12, 8) == pytest.approx(10.0 + 30.0 - 0.25)
    assert t.rows_cost(0, 12, 4) == pytest.approx(4.5 + 12.0 - 0.25)  # 4 rows were not measured
    again = LatencyTable.from_json(t.to_json())
    assert again.rows == t.rows
    # Rule 6 with measured rows: every range runs at every step here (all tokens reach 12), for 8 rows.
    assert replay_cost(t, (), [[12] * 10] * 8, batch=8) == pytest.approx((10.0 + 30.0 - 0.25) / 8)
    import json

    written = json.loads(t.to_json())
    del written["rows"]  # a profile written before batch steps were measured
    older = LatencyTable.from_json(json.dumps(written))
    assert older.rows == {} and older.segments == t.segments


def test_model_table_is_a_roofline():
    """On a made-up device whose compute and bandwidth cross at 4 tokens in fp32: a layer's time is its
    weights' bytes over the bandwidth up to 4 tokens a call, then grows with the tokens; its weights are
    those of a transformers Llama layer of the same shape (norms aside)."""
    from dataclasses import replace

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16)
    layer = LlamaDecoderLayer(config, 0)
    weights = sum(p.numel() for name, p in layer.named_parameters() if "norm" not in name)
    assert SHAPE.layer_params == weights
    device = replace(get_target("cpu"), bandwidth_gbs=100.0, fp16_tflops=0.2, int8_tops=0.4, layer_floor_us=3.0)
    t32 = model_table(device, SHAPE, "fp32")
    memory = weights * 4 / 100e9  # fp32 weights over 100 GB/s; 2 x weights x tokens operations at 0.2 TFLOPS
    want = [3e-6 + max(memory, 2 * weights * s / 0.2e12) for s in range(1, 9)]
    assert t32.layer == pytest.approx(want)
    assert t32.layer[0] == t32.layer[3] < t32.layer[4]  # bandwidth-bound up to 4 tokens, compute-bound after
    t4 = model_table(device, SHAPE, "int4")  # half a byte a weight and a 4-byte scale per 32 weights
    assert t4.layer[0] == pytest.approx(3e-6 + max(weights * (0.5 + 4 / 32) / 100e9, 2 * weights / 0.4e12))
    assert t32.call_overhead == pytest.approx(device.call_overhead_us * 1e-6)


def test_profile_for_another_model_is_refused(tmp_path):
    t = model_table(get_target("cpu"), SHAPE, "fp32")
    path = tmp_path / "profile.json"
    path.write_text(t.to_json())
    assert load_profile(path, SHAPE, "fp32").layer == t.layer
    other = ModelShape("llama", 30, 576, 1536, 9, 3, 64, 49152)
    with pytest.raises(InputError, match="measured for another model"):
        load_profile(path, other, "fp32")
    with pytest.raises(InputError, match="measured at fp32, not int4"):
        load_profile(path, SHAPE, "int4")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not a readable latency profile"):
        load_profile(tmp_path / "bad.json", SHAPE, "fp32")


@pytest.mark.parametrize("threshold", [0.1, 0.2])
def test_the_replay_makes_the_engines_calls(llama_compiled, threshold, monkeypatch):
    """`decode_calls`, given the exits the engine took, makes the engine's own calls step by step: seven
    requests of different lengths through four rows (admitted as rows free up, prefilled a step before
    they decode), rows leaving at their own exits, riding deeper calls, catching up alone or in rounds.
    Recorded at `SegmentKV.call`, prefills left out."""
    from collections import Counter

    import eec.runtime.core as core
    from eec.runtime import load
    from eec.runtime.engine import Engine
    from eec.runtime.kv import SegmentKV
    from eec.targets.replay import decode_calls

    model = load(llama_compiled.artifact)
    n = llama_compiled.hf.config.num_hidden_layers
    steps: list[list[tuple]] = []
    prefilling = [False]
    call, block, prefill, rounds = SegmentKV.call, SegmentKV.block_step, core.Batch.prefill, core.Batch._rounds
    in_rounds = []

    def recorded_call(self, role, slots, x, counts=None):
        if not prefilling[0]:
            steps[-1].append((self.spec.start, self.spec.stop, len(slots), x.shape[1]))
        return call(self, role, slots, x, counts)

    def recorded_block(self, graph, first, x):  # early exit's step calls a block of rows directly
        steps[-1].append((self.spec.start, self.spec.stop, x.shape[0], x.shape[1]))
        return block(self, graph, first, x)

    def recorded(strategy):
        def run(self, *a, **k):
            if not prefilling[0]:
                steps.append([])
            return strategy(self, *a, **k)
        return run

    def recorded_prefill(self, *a, **k):  # its calls, and the step it ends with, are the prompt's
        prefilling[0] = True
        try:
            return prefill(self, *a, **k)
        finally:
            prefilling[0] = False

    monkeypatch.setattr(SegmentKV, "call", recorded_call)
    monkeypatch.setattr(SegmentKV, "block_step", recorded_block)
    for name in ("step", "early"):  # the general step, and early exit's own (it goes on as `step` does)
        monkeypatch.setattr(core.Batch, name, recorded(getattr(core.Batch, name)))
    monkeypatch.setattr(core.Batch, "prefill", recorded_prefill)
    monkeypatch.setattr(core.Batch, "_rounds", lambda self, *a: in_rounds.append(1) or rounds(self, *a))
    prompts = PROMPTS_FOR_REPLAY
    engine = Engine(model, max_batch=4)
    requests = [engine.submit(p, thresholds=threshold, max_new_tokens=m, ignore_eos=True)
                for p, m in zip(prompts, (19, 14, 24, 16, 21, 13, 18))]
    engine.run()
    generations = [r.result().exits[1:] for r in requests]  # the first token came from the prefill
    layers = Counter(e for g in generations for e in g)
    assert len(layers) >= 3 and n in layers, f"the tokens must leave at several depths, got {layers}"
    ran = [Counter(s) for s in steps]
    replayed = [Counter((c.start, c.stop, c.rows, c.positions) for c in s)
                for s in decode_calls(llama_compiled.exits, n, generations, 4)]
    assert replayed == ran
    assert any(c[3] > 1 for s in steps for c in s), "some row must catch up several positions"
    assert in_rounds, "some step must run a catch-up in rounds"
    assert any(c[2] > 1 and c[0] > 0 for s in steps for c in s), "deeper segments must run several rows"


PROMPTS_FOR_REPLAY = [[3, 17, 42, 8, 91, 5], [60], list(range(10, 40)), [7, 7, 9], [50, 2, 33, 81, 4],
                      [11, 12], [90, 1, 5, 5]]


def test_host_work_is_fitted_and_priced():
    """eec's own work around the calls, from two artifacts' steps (8 segment calls and 1; 7 exits asked
    and none): a fixed part of a step, a part per call and a part per exit decision. Rule 3 charges a
    token the step, a call per segment it reaches and a decision per exit it reaches; rule 6 a step,
    its calls and its heads' decisions."""
    samples = [[1, 8, 7, 100e-6 + 8 * 20e-6, 100e-6 + 8 * 20e-6 + 7 * 5e-6], [1, 1, 0, 120e-6, 120e-6],
               [4, 8, 7, 150e-6 + 8 * 30e-6, 150e-6 + 8 * 30e-6 + 7 * 9e-6], [4, 1, 0, 180e-6, 180e-6]]
    host = fit_host(samples)
    assert host[1] == pytest.approx([100e-6, 20e-6, 5e-6]) and host[4] == pytest.approx([150e-6, 30e-6, 9e-6])
    assert fit_host(samples[:1])[1] == pytest.approx([0.0, 260e-6 / 8, 5e-6])  # one artifact: all of it per call
    t = table(layer_s=1.0, head_s=2.0, marginal=0.5)
    plain = cost_breakdown(t, (3, 6), {3: 60, 6: 25, 12: 15})
    t.host = {1: [0.1, 0.2, 0.05], 4: [0.3, 0.4, 0.07]}
    assert t.host_cost(1) == (0.1, 0.2, 0.05) and t.host_cost(8) == (0.3, 0.4, 0.07)
    parts = cost_breakdown(t, (3, 6), {3: 60, 6: 25, 12: 15})
    assert parts["host"] == pytest.approx(0.1 + (1.0 + 0.4 + 0.15) * 0.2 + (1.0 + 0.4) * 0.05)
    assert plain["host"] == 0.0 and {k: v for k, v in parts.items() if k != "host"} == pytest.approx(
        {k: v for k, v in plain.items() if k != "host"})
    # Rule 6, the first case of `test_a_batch_is_priced_call_by_call` (three steps; calls 2, 2 and 1, of
    # which one a step asks exit 3): its graphs' price plus 3 steps, 5 calls and 3 decisions, over 5 tokens.
    generations = [[3, 12, 3], [12, 3]]
    graphs = replay_cost(table(layer_s=1.0, head_s=2.0, marginal=0.5), (3,), generations, batch=4)
    assert replay_cost(t, (3,), generations, batch=4) == pytest.approx(graphs + (3 * 0.3 + 5 * 0.4 + 3 * 0.07) / 5)
