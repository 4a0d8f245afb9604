"""Exit placement: the set of exits that minimises expected per-token latency at accuracy level ε.

Rules:
1. Candidates are the subsets of the layers that have heads (all of them up
   to `MAX_EXHAUSTIVE` candidate layers; beyond that, greedy removal from the
   full set). The empty set, the full model alone, is always a candidate:
   placement may answer "no exit pays here".
2. For a candidate set, thresholds are calibrated on the traces restricted
   to its exits, in cascade order (`eec.calib.traces.thresholds_for`), and
   each calibration token's exit layer is replayed from them.
3. A token that leaves at exit e pays the segments up to e and the heads of
   every exit up to and including e; with exit classifiers (``gated``) only
   the head of e, since a classifier that says "stay" skips the head. A head
   inside its segment's graph (`--fuse-heads`, measured as such) costs what
   that call adds to the plain one. Each later segment then runs that
   token's position once more as part of the next deep token's call
   (catch-up), paying the segment's marginal cost of one more position in
   a long call: the slope of its measured times from 2 to 8 positions,
   ``(t(8) - t(2)) / 6``. A call that carries exited positions also pays,
   once, what going from 1 to 2 positions costs beyond that slope (the
   kernels switch from vector to matrix products there); there are as many
   such calls as the fewer of the tokens that exited before the segment and
   the tokens that reach it. A token that reaches the last layer pays every
   segment and every head of the set. Where the profile measured eec's host
   work (`LatencyTable.host_cost`), a token also pays a step's fixed part, a
   part per segment it reaches and a part per exit it is judged at.
4. The full model is one segment over all layers with the final head; the
   predicted speedup is its cost over the set's expected cost.
5. Among sets predicted within `TOLERANCE` of the cheapest, the one with the
   fewest exits wins: every exit adds host work (the decoder's checks,
   pending positions) that profiles measured before held nothing of, and
   that a measured one holds as an average, so measured speedups fall
   further below predictions as sets grow (docs/benchmarks.md).
6. ``batch`` B > 1 prices a decode step of B sequences (a server's batch),
   per token, by replaying the calibration generations B at a time as the
   engine decodes them, call by call (`eec.targets.replay`): a segment runs
   at a step when some row reaches it, the rows that left earlier ride its
   call, a row that goes deeper runs what it owes in a call of its own or in
   rounds; each call is priced from the table (`LatencyTable.rows_cost` for
   several rows). The full model is replayed over the same generations. A
   closed form used before (a segment runs at 1 - (1 - q)^B of the steps,
   independence assumed) ranked the code model's exit 2 over exit 3 at
   batch 8 where exit 3 measures best; the replay predicts exit 3's graph
   time within 5% (docs/benchmarks.md, "Placement for a batch"). At B = 1
   this is rule 3, which prices the same calls in closed form.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from eec.calib.traces import Traces, exit_layers, simulate, thresholds_for
from eec.errors import InputError
from eec.targets.latency import LatencyTable
from eec.targets.replay import replay_cost

MAX_EXHAUSTIVE = 12
TOLERANCE = 0.02  # rule 5


@dataclass
class Candidate:
    exits: tuple[int, ...]
    expected_s: float  # per token
    speedup: float  # full model cost / expected_s
    exit_rate: float
    agreement: float  # on the calibration traces (teacher-forced)
    exits_taken: dict[int, int]


@dataclass
class Placement:
    best: Candidate
    ranked: list[Candidate]  # best first
    full_s: float
    epsilon: float
    batch: int = 1  # sequences decoded together that the costs are for (rule 6)

    @property
    def runners_up(self) -> list[Candidate]:
        return self.ranked[1:4]


def expected_cost(table: LatencyTable, exits: tuple[int, ...], exit_counts: dict[int, int],
                  splits: tuple[int, ...] | None = None, gated: bool = False, propagate: bool = False) -> float:
    """Mean per-token seconds for ``exits`` given how many tokens leave at each (rule 3), one sequence.

    ``splits`` are the segment boundaries when they are not the exits themselves
    (an artifact whose exits are not all active); heads run only at ``exits``,
    and with ``gated`` only at the exit a token leaves by.
    """
    return sum(cost_breakdown(table, exits, exit_counts, splits, gated, propagate).values())


def cost_breakdown(table: LatencyTable, exits: tuple[int, ...], exit_counts: dict[int, int],
                   splits: tuple[int, ...] | None = None, gated: bool = False,
                   propagate: bool = False) -> dict[str, float]:
    """`expected_cost` in its parts, mean seconds per token: ``segments`` (the layers a token runs,
    one position), ``heads`` (exit heads; the final head is inside the last segment),
    ``catch_up`` (later segments re-running an exited position with the next deep token) and
    ``host`` (eec's own work around the calls, where the profile measured it: a step, each segment
    call, each exit's decision).

    With ``propagate`` and fill graphs in the table that cover a later range, an exited position
    costs that range's fill per position instead, and every token that goes through a range after
    an exit that some tokens take pays one fill call's fixed part there (`--catch-up propagate`);
    ranges the fills do not cover are costed as the exact catch-up."""
    n_layers = table.shape.num_layers
    bounds = [0, *sorted(set(exits) | set(splits or ())), n_layers]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    one = [table.range_cost(a, b, 1) for a, b in ranges]
    marginal = [max((table.range_cost(a, b, 8) - table.range_cost(a, b, 2)) / 6, 0.0) for a, b in ranges]
    step = [max(table.range_cost(a, b, 2) - c - m, 0.0) for (a, b), c, m in zip(ranges, one, marginal)]
    fixed = [0.0] * len(ranges)  # per token that reaches the range after an exit: a fill call's fixed part
    if propagate:
        for k, (a, b) in enumerate(ranges):
            fill = table.fill_costs(a, b)
            if fill is not None:
                fixed[k], marginal[k], step[k] = *fill, 0.0
    # With a classifier the head runs apart, only for tokens that leave; otherwise a segment measured
    # with its head inside prices the head as what fusing it adds to the segment's call.
    heads = [(table.head_cost(b) if gated else table.exit_cost(a, b)) if b in exits else 0.0 for a, b in ranges]
    total = sum(exit_counts.values())
    counts = [exit_counts.get(stop, 0) if total else int(stop == n_layers) for _, stop in ranges]
    total = total or 1
    step_s, call_s, exit_s = table.host_cost(1)
    parts = {"segments": 0.0, "heads": 0.0, "catch_up": 0.0, "host": step_s}
    for k, (_, stop) in enumerate(ranges):
        reach = sum(counts[k:]) / total  # the share of tokens that reach range k
        behind = 1.0 - reach  # positions left for a later catch-up
        parts["segments"] += reach * one[k]
        parts["heads"] += counts[k] / total * heads[k] if gated else reach * heads[k]
        parts["host"] += reach * (call_s + (exit_s if stop in exits else 0.0))
        parts["catch_up"] += behind * marginal[k]
        if k and any(counts[:k]):  # a fill call before range k's own run, for the tokens that reach it
            parts["catch_up"] += reach * fixed[k]
            parts["catch_up"] += min(behind, reach) * step[k]  # calls carrying exited positions
    return parts


def speculative_breakdown(table: LatencyTable, draft: int, cycles: dict[int, int], tokens: int,
                          splits: tuple[int, ...] | None = None, gated: bool = False) -> dict[str, float]:
    """Speculative mode's cost in `cost_breakdown`'s parts, mean seconds per emitted token, for
    ``cycles`` (draft calls in a cycle -> how many cycles made that many) that emitted ``tokens``,
    drafting at the exit at layer ``draft``; ``splits``: the artifact's segment boundaries.

    A draft call runs the segments up to ``draft`` over one position and the exit's head
    (``segments``, ``heads``; priced as in `cost_breakdown`, and with an exit classifier too: a
    draft runs the head unless the classifier ends the cycle). The verify, in the part the catch-up
    holds in early exit (``catch_up``), runs the later segments once over the m drafted positions,
    the last one through its verify graph (`LatencyTable.verify_cost`)."""
    n_layers = table.shape.num_layers
    bounds = [0, *sorted(set(splits or ()) | {draft}), n_layers]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    k = bounds.index(draft) - 1  # the range that ends at the draft exit
    one = sum(table.range_cost(a, b, 1) for a, b in ranges[: k + 1])
    head = table.head_cost(draft) if gated else table.exit_cost(*ranges[k])
    parts = {"segments": 0.0, "heads": 0.0, "catch_up": 0.0}
    for m, count in cycles.items():
        parts["segments"] += count * m * one
        parts["heads"] += count * m * head
        parts["catch_up"] += count * sum(table.verify_cost(a, b, m) if b == n_layers else table.range_cost(a, b, m)
                                         for a, b in ranges[k + 1:])
    return {name: value / (tokens or 1) for name, value in parts.items()}


def evaluate(traces: Traces, table: LatencyTable, exits: tuple[int, ...], eps: float, metric: str, rule: str,
             delta: float, propagate: bool = False, batch: int = 1) -> Candidate:
    gated = metric == "classifier"
    n_layers = table.shape.num_layers
    if batch > 1 and propagate:
        raise InputError("placement prices a batch for the exact catch-up; with --catch-up propagate "
                         "nothing rides: place for one sequence")
    layers = np.full(len(traces), n_layers)
    if exits:
        sub = traces.columns(list(exits))
        taus = thresholds_for(sub, eps, metric, rule, delta)
        sim = simulate(sub, taus, metric, n_layers)
        counts, rate, agree = sim.exits, sim.exit_rate, sim.agreement
        layers = exit_layers(sub, taus, metric, n_layers)
    else:
        counts, rate, agree = {n_layers: len(traces)}, 0.0, 1.0
    if batch > 1:  # rule 6
        cost = replay_cost(table, exits, generations(traces, layers), batch, gated)
        full = full_cost(traces, table, batch)
    else:
        cost = expected_cost(table, exits, counts, gated=gated, propagate=propagate)
        full = full_cost(traces, table, batch)
    return Candidate(exits, cost, full / cost, rate, agree, counts)


def generations(traces: Traces, layers: np.ndarray) -> list[list[int]]:
    """Each calibration sequence's exit layer per traced token, in order (``layers``: one per trace row)."""
    return [layers[traces.sequence == s].tolist() for s in np.unique(traces.sequence)]


def full_cost(traces: Traces, table: LatencyTable, batch: int) -> float:
    """Mean seconds a token of the full model over the traces' generations, ``batch`` at a time (rule 6)."""
    n_layers = table.shape.num_layers
    if batch <= 1:
        return expected_cost(table, (), {n_layers: 1})
    return replay_cost(table, (), generations(traces, np.full(len(traces), n_layers)), batch)


def place_exits(traces: Traces, table: LatencyTable, eps: float, metric: str, rule: str = "risk",
                delta: float = 0.1, propagate: bool = False, batch: int = 1) -> Placement:
    layers = tuple(sorted(traces.exits))
    price = functools.partial(evaluate, traces, table, eps=eps, metric=metric, rule=rule, delta=delta,
                              propagate=propagate, batch=batch)
    if len(layers) <= MAX_EXHAUSTIVE:
        ranked = [price(s) for r in range(len(layers) + 1) for s in itertools.combinations(layers, r)]
    else:
        ranked = _greedy(price, layers)
    ranked.sort(key=lambda c: (c.expected_s, len(c.exits)))
    near = [c for c in ranked if c.expected_s <= ranked[0].expected_s * (1 + TOLERANCE)]
    best = min(near, key=lambda c: (len(c.exits), c.expected_s))
    ranked.remove(best)
    return Placement(best, [best, *ranked], full_cost(traces, table, batch), eps, batch)


def _greedy(price: Callable[[tuple[int, ...]], Candidate], layers: tuple[int, ...]) -> list[Candidate]:
    """Drop, one at a time, the exit whose removal lowers the expected cost (``price``) most."""
    current = price(layers)
    seen = [current, price(())]
    while current.exits:
        options = [price(tuple(e for e in current.exits if e != drop)) for drop in current.exits]
        seen += options
        best = min(options, key=lambda c: c.expected_s)
        if best.expected_s >= current.expected_s:
            break
        current = best
    unique = {c.exits: c for c in seen}
    return list(unique.values())


def describe(p: Placement) -> list[str]:
    def line(c: Candidate) -> str:
        where = ",".join(map(str, c.exits)) or "none (full model)"
        return (f"exits {where}: predicted {c.speedup:.2f}x, {c.expected_s * 1e3:.2f} ms/token, "
                f"{c.exit_rate:.0%} of tokens exit, agreement {c.agreement:.3f}")

    batch = f", {p.batch} sequences at once" if p.batch > 1 else ""
    lines = [f"placement at ε = {p.epsilon}{batch}: full model {p.full_s * 1e3:.2f} ms/token", "chosen  " + line(p.best)]
    lines += ["runner-up " + line(c) for c in p.runners_up]
    if not p.best.exits:
        lines.append("no exit pays here: every exit set is predicted slower than the full model")
    return lines

