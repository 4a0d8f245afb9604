"""Exit sets priced for a batch by placement's replay (`eec.targets.replay`), on the calibration traces,
on other traces, and on free generation.

For each set of exits, thresholds at ε are fitted on an artifact's calibration traces (restricted to
that set, as placement does), each calibration token's exit is replayed, and the generations are
decoded ``B`` at a time call by call as `eec.runtime.engine.Engine` decodes them, each call priced
from a latency profile (`eec targets measure`, with ``--batch B`` for measured rows): what
`eec compile --exits auto --batch B` ranks the sets by. Graph time only: eec's host work per step is
not in a profile (`bench/step_host.py` times it). ``--replay HELD.eec`` replays another calibration
of the same artifact (`eec calibrate` on a copy with other prompts) under the thresholds fitted on
the first: how the sets price on traffic the thresholds were not fitted on. ``--generate PROMPTS``
also decodes the prompts freely (128 new tokens, 8 at a time, each set's thresholds at its exits
only) and replays those generations: the exit rate and price generating on its own beside the
traced ones. Usage:

    .venv/bin/python bench/batch_replay.py ALL_EXITS.eec PROFILE.json --sets 2 3 2,6 [--batches 1,8] [--eps 0.9]
        [--replay HELD.eec] [--generate P.txt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from eec.calib.calibrate import read_prompts
from eec.calib.traces import exit_layers, thresholds_for
from eec.runtime import load
from eec.targets.latency import LatencyTable
from eec.targets.replay import replay_cost


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
    print(f"{'exits':>8}  {'traces':>6}  {'exit rate':>9}  " + "  ".join(f"{'batch ' + str(b):>9}" for b in batches))

    def row(exits: tuple[int, ...], name: str, generations: list[list[int]]) -> None:
        rate = np.mean([layer < n_layers for g in generations for layer in g])
        speedups = [replay_cost(table, (), [[n_layers] * len(g) for g in generations], b)
                    / replay_cost(table, exits, generations, b) for b in batches]
        print(f"{','.join(map(str, exits)):>8}  {name:>6}  {rate:9.3f}  " + "  ".join(f"{x:8.2f}x" for x in speedups))

    for text in args.sets:
        exits = tuple(int(x) for x in text.split(","))
        taus = thresholds_for(traces.columns(list(exits)), args.eps, metric, "risk", 0.1)
        layers = exit_layers(replayed.columns(list(exits)), taus, metric, n_layers)
        row(exits, "held" if args.replay else "calib",
            [layers[replayed.sequence == s].tolist() for s in np.unique(replayed.sequence)])
        if args.generate:
            row(exits, "free", free_running(model, args.generate, taus))


def free_running(model, prompts: Path, thresholds: dict[int, float]) -> list[list[int]]:
    """Each prompt's exit layer per token when the prompts decode on their own (the first token, from
    the prompt's pass through every layer, left out)."""
    ids = [model.encode(p, chat=False) for p in read_prompts(prompts, model.codec is not None)]
    return [result.exits[1:] for result in model.generate(ids, max_new_tokens=128, thresholds=thresholds, max_batch=8)]


if __name__ == "__main__":
    main()
