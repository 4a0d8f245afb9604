"""Exit sets priced for a batch by replaying the runtime's calls, against placement's closed form.

For each set of exits, thresholds at ε are fitted on an artifact's calibration traces (restricted to
that set, as placement does), each calibration token's exit is replayed, and the generations are run
``B`` at a time as `eec.runtime.engine.Engine` runs them: every step, the rows still going run each
segment; a row that left at an exit and owes the next segment one position rides that call; a row
going deeper with several owed positions runs them in a call of its own, or all such rows go in
rounds of one-position calls where that takes fewer calls (`eec.runtime.core.Batch._run`). Each
call is priced from a latency profile (`eec targets measure`, with ``--batch B`` for measured rows):
n rows at one position interpolated between one row and B measured rows; one row over n positions as
measured up to 8, then by the slope from 2 to 8. An exit's head is priced once a step when any row
reaches it. Graph time only: eec's host work per step is not in a profile (`bench/step_host.py` times
it). ``--replay HELD.eec`` replays another calibration of the same artifact (`eec calibrate` on a copy
with other prompts) under the thresholds fitted on the first: how the sets price on traffic the
thresholds were not fitted on. ``--generate PROMPTS`` also decodes the prompts freely (128 new tokens,
8 at a time, each set's thresholds at its exits only) and prints each set's exit rate generating on
its own beside the traced one, priced by placement's closed form. Usage:

    .venv/bin/python bench/batch_replay.py ALL_EXITS.eec PROFILE.json --sets 2 3 2,6 [--batches 1,8] [--eps 0.9]
        [--replay HELD.eec] [--generate P.txt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from eec.calib.traces import exit_layers, thresholds_for
from eec.runtime import load
from eec.targets.latency import LatencyTable
from eec.calib.calibrate import read_prompts
from eec.targets.placement import evaluate, expected_cost


def replay(table: LatencyTable, exits: tuple[int, ...], generations: list[list[int]], batch: int) -> float:
    """Mean graph seconds a token for ``generations`` (each token's exit layer) decoded ``batch`` at a time."""
    n_layers = table.shape.num_layers
    bounds = [0, *sorted(exits), n_layers]
    segments = list(zip(bounds[:-1], bounds[1:]))

    def rows(a: int, b: int, n: int) -> float:  # n rows, one position each
        one = table.range_cost(a, b, 1)
        if n <= 1 or batch <= 1:
            return one
        full = table.rows_cost(a, b, batch)
        return one + (full - one) * (n - 1) / (batch - 1)

    def positions(a: int, b: int, n: int) -> float:  # one row, n positions
        if n <= 8:
            return table.range_cost(a, b, n)
        top, two = table.range_cost(a, b, 8), table.range_cost(a, b, 2)
        return top + (n - 8) * max((top - two) / 6, 0.0)

    waiting, live = list(generations), []  # live: [exit layers, next token, owed positions per segment]
    seconds = tokens = 0.0
    while waiting or live:
        while len(live) < batch and waiting:
            live.append([waiting.pop(0), 0, [0] * len(segments)])
        going, left = list(range(len(live))), set()
        for j, (a, b) in enumerate(segments):
            if not going:
                break
            owed = [live[i][2][j] for i in range(len(live))]
            riders = [i for i in left if owed[i] == 1] if j else []
            several = [i for i in going if owed[i] > 0]
            singles = [i for i in going if owed[i] == 0] + riders
            if several and max(owed[i] + 1 for i in several) < len(several) + bool(singles):
                depth = max(owed[i] + 1 for i in several)
                for r in range(depth):
                    n = sum(r >= depth - owed[i] - 1 for i in several) + (len(singles) if r == depth - 1 else 0)
                    seconds += rows(a, b, n)
            else:
                seconds += rows(a, b, len(singles)) if singles else 0.0
                seconds += sum(positions(a, b, owed[i] + 1) for i in several)
            for i in riders + several:  # their positions went through: the next segment owes them
                if j + 1 < len(segments):
                    live[i][2][j + 1] += live[i][2][j]
                live[i][2][j] = 0
            if b in exits:
                seconds += table.exit_cost(a, b)
                leaving = [i for i in going if live[i][0][live[i][1]] == b]
                for i in leaving:
                    live[i][2][j + 1] += 1
                left |= set(leaving)
                going = [i for i in going if i not in left]
        for row in live:
            row[1] += 1
        tokens += len(live)
        live = [row for row in live if row[1] < len(row[0])]
    return seconds / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="a calibrated artifact with every candidate exit")
    parser.add_argument("profile", type=Path)
    parser.add_argument("--sets", nargs="+", required=True, help="exit sets, each comma-separated layers")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--eps", type=float, default=0.9)
    parser.add_argument("--shortlist", type=int, default=0, help="the exits' token list, to price their heads")
    parser.add_argument("--replay", type=Path, help="a copy calibrated on other prompts, whose traces are replayed")
    parser.add_argument("--generate", type=Path, help="prompts to decode freely with each set's thresholds")
    args = parser.parse_args()

    model = load(args.artifact)
    traces, metric = model.traces, model.manifest.calibration.metric
    replayed = load(args.replay).traces if args.replay else traces
    table = LatencyTable.from_json(args.profile.read_text())
    if args.shortlist:
        table = table.with_head_fraction(args.shortlist / model.manifest.model.vocab_size)
    n_layers = table.shape.num_layers
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{'exits':>8}  {'exit rate':>9}  " + "  ".join(f"{'b' + str(b) + ' replay':>10}  {'placement':>9}"
                                                     for b in batches))
    for text in args.sets:
        exits = tuple(int(x) for x in text.split(","))
        taus = thresholds_for(traces.columns(list(exits)), args.eps, metric, "risk", 0.1)
        layers = exit_layers(replayed.columns(list(exits)), taus, metric, n_layers)
        generations = [layers[replayed.sequence == s].tolist() for s in np.unique(replayed.sequence)]
        cells = []
        for b in batches:
            full = table.rows_cost(0, n_layers, b) / b if b > 1 else table.range_cost(0, n_layers, 1)
            closed = evaluate(traces, table, exits, args.eps, metric, "risk", 0.1, batch=b).speedup
            cells.append(f"{full / replay(table, exits, generations, b):9.2f}x  {closed:8.2f}x")
        print(f"{text:>8}  {np.mean(layers < n_layers):9.3f}  " + "  ".join(cells))
        if args.generate:
            counts = free_running(model, args.generate, taus)
            rate = 1 - counts.get(n_layers, 0) / sum(counts.values())
            priced = [(table.rows_cost(0, n_layers, b) / b if b > 1 else table.range_cost(0, n_layers, 1))
                      / expected_cost(table, exits, counts, batch=b) for b in batches]
            print(f"{'free':>8}  {rate:9.3f}  " + "  ".join(f"{'':>10}  {p:8.2f}x" for p in priced))


def free_running(model, prompts: Path, thresholds: dict[int, float]) -> dict[int, int]:
    """Tokens leaving at each layer when the prompts decode on their own (the first token, from the
    prompt's pass through every layer, left out)."""
    ids = [model.encode(p, chat=False) for p in read_prompts(prompts, model.codec is not None)]
    counts: dict[int, int] = {}
    for result in model.generate(ids, max_new_tokens=128, thresholds=thresholds, max_batch=8):
        for layer in result.exits[1:]:
            counts[layer] = counts.get(layer, 0) + 1
    return counts


if __name__ == "__main__":
    main()
