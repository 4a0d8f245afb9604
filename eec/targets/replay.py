"""A batch's decoding, replayed call by call on calibration traces: what placement prices for B > 1 rows.

Given each generation's exit layer per decoded token (a calibration trace under a candidate set's
thresholds), `decode_calls` makes the graph calls `eec.runtime.engine.Engine` makes when it decodes
those generations ``batch`` at a time with the exact catch-up, at the level of `SegmentKV.call`:

- a request waits for a free row; a row admitted at a step has its prefill there and decodes from
  the next step on (prefills are not decode calls and are left out);
- at each step every segment runs for the rows still going: one call over the rows that add one
  position, where the rows that left at an earlier exit this step and owe the segment exactly that
  position ride along; one call per row that adds several (its catch-up: GroupQueryAttention takes
  several positions after a past for one row at a time); or, where that takes fewer calls, rounds of
  one-position calls over every row that still has a position (`eec.runtime.core.Batch._run`);
- a segment's exit head runs in that step's call (or right after it) when a row reaches the exit;
  with exit classifiers (``gated``) only when a row leaves by it;
- a row that leaves owes the next segment its position (and whatever it owed before) until it next
  goes deeper; a generation that ends owing positions never pays for them.

`replay_cost` prices the calls from a latency table. Why a replay and not a closed form: at B rows a
segment runs when any row reaches it, so its price hangs on how a generation's deep tokens fall
among the steps, and on how the runtime shapes the calls that carry the owed positions. The closed
form it replaces (a segment runs at 1 - (1 - q)^B of the steps, independence assumed; owed positions
at the slope of one long call) ranked the exit-trained code model's exit 2 over exit 3 at batch 8
(1.51x against 1.45x) where exit 3 measures best; replayed, exit 3's graph time came within 5% of
its measurement (docs/benchmarks.md, "Placement for a batch"). numpy-free and torch-free.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from eec.targets.latency import LatencyTable


@dataclass(frozen=True)
class Call:
    """One `SegmentKV.call`: layers [start, stop) over ``rows`` rows of ``positions`` positions each
    (several positions: one row), with the exit head at ``stop`` (``head``) or without."""

    start: int
    stop: int
    rows: int
    positions: int
    head: bool = False


def decode_calls(exits: Sequence[int], num_layers: int, generations: Sequence[Sequence[int]], batch: int,
                 gated: bool = False) -> list[list[Call]]:
    """The calls of each decode step when ``generations`` (each one's exit layer per decoded token,
    ``num_layers`` for a token that ran every layer) decode ``batch`` at a time, in order of arrival.
    A head runs at an exit a row reaches, or with ``gated`` (exit classifiers) one a row leaves by."""
    bounds = [0, *sorted(set(exits)), num_layers]
    segments = list(zip(bounds[:-1], bounds[1:]))
    last = len(segments) - 1
    waiting = [list(g) for g in reversed(generations) if len(g)]
    rows: list[list] = []  # [exit layers, next token, owed positions per segment]
    steps: list[list[Call]] = []
    while waiting or rows:
        running, admitted = rows, []
        while waiting and len(running) + len(admitted) < batch:  # prefilled at this step, decoding from the next
            admitted.append([waiting.pop(), 0, [0] * len(segments)])
        calls: list[Call] = []
        going, left = list(range(len(running))), []
        for j, (a, b) in enumerate(segments):
            if not going:
                break
            owed = [running[i][2][j] for i in range(len(running))]
            riders = [i for i in left if owed[i] == 1] if j else []
            several = [i for i in going if owed[i] > 0]
            singles = [i for i in going if owed[i] == 0] + riders
            asked = j < last  # every row has a threshold at each of the set's exits
            # the head: in the call that carries each row's current position
            head = asked and (not gated or any(running[i][0][running[i][1]] == b for i in going))
            depth = max((owed[i] + 1 for i in several), default=0)
            if several and depth < len(several) + bool(singles):
                for r in range(depth):
                    n = sum(r >= depth - owed[i] - 1 for i in several) + (len(singles) if r == depth - 1 else 0)
                    calls.append(Call(a, b, n, 1, head and r == depth - 1))
            else:
                if singles:
                    calls.append(Call(a, b, len(singles), 1, head))
                calls += [Call(a, b, 1, owed[i] + 1, head and not singles and k == 0) for k, i in enumerate(several)]
            for i in riders + several:  # their positions went through: the next segment owes them
                if j < last:
                    running[i][2][j + 1] += owed[i]
                running[i][2][j] = 0
            if asked:
                leaving = [i for i in going if running[i][0][running[i][1]] == b]
                for i in leaving:
                    running[i][2][j + 1] += 1
                left += leaving
                going = [i for i in going if i not in leaving]
        if calls:
            steps.append(calls)
        for row in running:
            row[1] += 1
        rows = [row for row in running if row[1] < len(row[0])] + admitted
    return steps


def call_cost(table: LatencyTable, call: Call, batch: int) -> float:
    """Seconds of one call, from the table: n rows at one position each as measured for the batch's
    size, between one row and ``batch`` rows in proportion; one row over n positions as
    `LatencyTable.positions_cost` prices it. A head adds what asking for the exit adds
    to the segment's one-position call (`LatencyTable.exit_cost`)."""
    a, b = call.start, call.stop
    one = table.range_cost(a, b, 1)
    if call.positions > 1:
        seconds = table.positions_cost(a, b, call.positions)
    elif call.rows == 1 or batch <= 1:
        seconds = one
    else:
        seconds = one + (table.rows_cost(a, b, batch) - one) * (call.rows - 1) / (batch - 1)
    return seconds + (table.exit_cost(a, b) if call.head else 0.0)


def replay_cost(table: LatencyTable, exits: Sequence[int], generations: Sequence[Sequence[int]], batch: int,
                gated: bool = False) -> float:
    """Mean seconds a decoded token when ``generations`` decode ``batch`` at a time (`decode_calls`): the
    calls, and eec's host work around them where the profile measured it (`LatencyTable.host_cost`:
    a step, each call, each exit decided)."""
    tokens = sum(len(g) for g in generations)
    steps = decode_calls(exits, table.shape.num_layers, generations, batch, gated)
    counts = Counter(call for step in steps for call in step)
    step_s, call_s, exit_s = table.host_cost(batch)
    host = len(steps) * step_s + sum(n * (call_s + exit_s * call.head) for call, n in counts.items())
    return (sum(n * call_cost(table, call, batch) for call, n in counts.items()) + host) / max(tokens, 1)
