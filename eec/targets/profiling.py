"""`eec profile`: measured speed and quality of an artifact at each accuracy level ε, on this device.

For every prompt and round, ``mode="full"`` and each ε are decoded back to
back (interleaved, so drifting machine load hits all of them alike); the
speedup is the median over those runs of early-exit decode tok/s over full
decode tok/s. Quality is teacher-forced: the full model's own continuation is
fed one token at a time and each position's early-exit prediction is compared
with it (`eec.runtime.evaluate`).

Beside the measured speedup stands the *ideal* one: the expected cost of the
measured exit distribution under the latency table measured on this device
(`eec.targets.measure`, `eec.targets.placement.expected_cost`; a head inside
its segment's graph priced as what that call adds), over the full
model's. Their ratio, realised / ideal, is what the runtime's own overhead
(Python, KV copies, host reads) leaves of the possible gain.

With ``speculative`` (an artifact with a verify graph), one more row times
speculative mode at that draft ε in the same interleaved rounds; its quality
is the share of positions where its free-running tokens equal full mode's
(1.0 but for near-ties, it being lossless), and its ideal prices the cycles
it made (draft calls each, one verify over their positions) from the same
table (`eec.targets.placement.speculative_breakdown`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from eec.runtime.evaluate import teacher_forced
from eec.runtime.model import EarlyExitModel
from eec.targets.latency import BYTES_PER_WEIGHT
from eec.targets.measure import measure_artifact, shape_of
from eec.targets.placement import cost_breakdown, speculative_breakdown

SPECULATIVE = "speculative"


@dataclass
class ProfileRow:
    epsilon: float | None  # None: the full model
    tokens_per_s: float  # median decode tok/s
    speedup: float  # median of per-run early-exit / full decode tok/s
    ideal_speedup: float  # from the measured exit distribution and the measured latency table
    agreement: float  # teacher-forced, against the full model's continuation
    exits: dict[int, int] = field(default_factory=dict)  # layer -> tokens that left there (timed runs)
    gb_per_s: float = 0.0  # weight bytes read per token x tokens/s
    # The ideal's mean per-token cost in parts, milliseconds (`eec.targets.placement.cost_breakdown`):
    # segments (one position each), exit heads, catch-up of exited positions. Exit classifiers are
    # inside their segments.
    cost_ms: dict[str, float] = field(default_factory=dict)
    mode: str = "early-exit"  # "full", "early-exit", or "speculative" (``epsilon``: its draft threshold)
    drafts_kept: float | None = None  # speculative: share of drafted tokens the full model confirmed
    tokens_per_verify: float | None = None  # speculative: tokens emitted per cycle (one verify call each)

    @property
    def realised_over_ideal(self) -> float:
        return self.speedup / self.ideal_speedup if self.ideal_speedup else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exits"] = {str(k): v for k, v in self.exits.items()}
        d["realised_over_ideal"] = self.realised_over_ideal
        return d


def _weight_bytes(model: EarlyExitModel) -> tuple[list[float], list[float]]:
    """Bytes of weights a call of each segment reads (the last one's with the final head; a token
    reads one row of the embedding, left out), and of each segment's exit head (0: none), from the
    model's shape at the artifact's precision: graph files do not tell, every graph's weights live
    in one shared file."""
    shape, spec = shape_of(model.manifest), model.manifest.model
    per_weight = BYTES_PER_WEIGHT.get(model.manifest.precision, 4.0)
    segments = model.manifest.segments
    seg_bytes = [(s.stop - s.start) * shape.layer_params * per_weight for s in segments]
    seg_bytes[-1] += shape.head_params * per_weight
    heads = [(s.exit.shortlist or spec.vocab_size) * spec.hidden_size * per_weight
             if s.exit and s.exit.kind != "final" else 0.0 for s in segments]
    return seg_bytes, heads


def bytes_per_token(model: EarlyExitModel, exits: dict[int, int], thresholds: dict[int, float] | None,
                    gated: bool = False) -> float:
    """Mean weight bytes a token reads: the segments it runs and the heads it passes (file sizes);
    with exit classifiers (``gated``) only the head it leaves by."""
    segments = model.manifest.segments
    seg_bytes, heads = _weight_bytes(model)
    head_bytes = [h if thresholds and s.exit and s.exit.layer in thresholds else 0 for s, h in zip(segments, heads)]
    total = sum(exits.values()) or 1
    cost = 0.0
    for k, spec in enumerate(segments):
        count = exits.get(spec.exit.layer if spec.exit else spec.stop, 0)
        cost += count * (sum(seg_bytes[: k + 1]) + (head_bytes[k] if gated else sum(head_bytes[: k + 1])))
    return cost / total


def decided_by_classifier(model: EarlyExitModel, metric: str | None) -> bool:
    """Whether exits are decided by exit classifiers (the ``classifier`` metric, given or the artifact's),
    so that a token runs only the head it leaves by."""
    cal = model.manifest.calibration
    return (metric or (cal.metric if cal else "")) == "classifier"


def decode_gb_per_s(model: EarlyExitModel, stats, mode: str, metric: str | None = None,
                    draft_layer: int | None = None) -> float | None:
    """Weight bytes a generation's decoded tokens read, times its tokens/s (gpt-fast's figure beside
    tokens/s: how near a decode came to the memory's bandwidth; the exits it took lower what a token
    reads). None for a generation of one token."""
    if stats.tokens_per_s <= 0:
        return None
    if mode == "speculative" and stats.cycles:
        read = speculative_bytes_per_token(model, draft_layer or model.exits[0], stats.cycles, stats.new_tokens)
    else:
        running = dict.fromkeys(model.exits) if mode == "early-exit" else None  # a head runs at every exit passed
        read = bytes_per_token(model, stats.exits, running, decided_by_classifier(model, metric))
    return read * stats.tokens_per_s / 1e9


def speculative_bytes_per_token(model: EarlyExitModel, draft: int, cycles: dict[int, int], tokens: int) -> float:
    """Mean weight bytes speculative mode reads per emitted token: each draft call the segments up to
    the exit at ``draft`` and its head, each cycle's verify the deeper segments once."""
    seg_bytes, heads = _weight_bytes(model)
    k = model.exits.index(draft)
    calls, verifies = sum(m * n for m, n in cycles.items()), sum(cycles.values())
    return (calls * (sum(seg_bytes[: k + 1]) + heads[k]) + verifies * sum(seg_bytes[k + 1:])) / (tokens or 1)


def profile_artifact(model: EarlyExitModel, prompts: Sequence, epsilons: Sequence[float], tokens: int = 128,
                     rounds: int = 2, metric: str | None = None, speculative: float | None = None,
                     draft_layer: int | None = None,
                     progress: Callable[[str, int, int], None] = lambda *a: None) -> list[ProfileRow]:
    """``speculative``: also time speculative mode, drafting at this ε (see the module's docstring) at
    the exit at ``draft_layer`` (default: the first)."""
    encoded = [model.encode(p) for p in prompts]
    # where the timed runs go; the ideal is the graphs' alone (what eec's host work leaves of it is the point)
    table = measure_artifact(model.root, repeats=10, device=model.device, host=False)
    spec = [SPECULATIVE] if speculative is not None else []
    levels: list = [None, *epsilons, *spec]
    thresholds = {e: model.thresholds_for(e, metric) for e in epsilons}
    index = model.resolve_thresholds("early-exit", epsilon=epsilons[0], metric=metric)[1] if epsilons else 0
    speeds: dict = {e: [] for e in levels}
    ratios: dict = {e: [] for e in levels[1:]}
    exits: dict = {e: {} for e in levels}
    drafts = [0, 0]  # accepted, drafted
    cycles: dict[int, int] = {}  # speculative mode's draft calls per cycle -> cycles, and the tokens they emitted
    cycle_tokens = 0
    spoken: dict[int, list[int]] = {}  # prompt index -> speculative mode's tokens (the timed runs')
    total, done = rounds * len(encoded) * len(levels) + len(encoded) * len(epsilons), 0
    model.generate(encoded[0], max_new_tokens=4, mode="full")  # warm-up
    for r in range(rounds):
        for k, ids in enumerate(encoded):
            base = None
            for e in levels:
                progress(f"round {r + 1}: {'full' if e is None else e if e == SPECULATIVE else f'ε={e}'}", done, total)
                kwargs = ({"mode": "full"} if e is None
                          else {"mode": SPECULATIVE, "epsilon": speculative, "metric": metric, "draft_layer": draft_layer}
                          if e == SPECULATIVE
                          else {"thresholds": thresholds[e], "metric": metric})
                got = model.generate(ids, max_new_tokens=tokens, ignore_eos=True, **kwargs)
                speed = model.stats.tokens_per_s
                if e == SPECULATIVE:
                    spoken[k] = got.tokens
                    drafts[0] += model.stats.accepted
                    drafts[1] += model.stats.drafted
                    cycle_tokens += model.stats.new_tokens - 1  # the first comes from the prompt's call
                    for m, n in model.stats.cycles.items():
                        cycles[m] = cycles.get(m, 0) + n
                speeds[e].append(speed)
                if e is None:
                    base = speed
                else:
                    ratios[e].append(speed / base)
                for layer, n in model.stats.exits.items():
                    exits[e][layer] = exits[e].get(layer, 0) + n
                done += 1
    references = [model.generate(ids, max_new_tokens=tokens, mode="full", ignore_eos=True).tokens for ids in encoded]
    splits = tuple(model.exits)
    full_parts = cost_breakdown(table, (), {model.num_layers: 1}, splits)
    full_cost = sum(full_parts.values())
    rows = []
    gated = decided_by_classifier(model, metric)
    for e in levels:
        if e == SPECULATIVE:
            same = [sum(int(a == b) for a, b in zip(spoken[k], ref)) for k, ref in enumerate(references)]
            draft = draft_layer or model.exits[0]
            parts = speculative_breakdown(table, draft, cycles, cycle_tokens, splits, gated)
            med = statistics.median(speeds[e])
            rows.append(ProfileRow(speculative, med, statistics.median(ratios[e]),
                                   full_cost / sum(parts.values()), sum(same) / sum(len(f) for f in references),
                                   dict(sorted(exits[e].items())),
                                   speculative_bytes_per_token(model, draft, cycles, cycle_tokens) * med / 1e9,
                                   cost_ms={k: v * 1e3 for k, v in parts.items()},
                                   mode=SPECULATIVE, drafts_kept=drafts[0] / drafts[1] if drafts[1] else None,
                                   tokens_per_verify=cycle_tokens / (sum(cycles.values()) or 1)))
            continue
        if e is None:
            agree, ideal, ratio, parts = 1.0, 1.0, 1.0, full_parts
        else:
            hits, count = 0, 0
            for ids, ref in zip(encoded, references):
                progress(f"agreement at ε={e}", done, total)
                predicted, _ = teacher_forced(model, ids, ref, thresholds[e], index)
                hits += sum(int(a == b) for a, b in zip(predicted, ref))
                count += len(ref)
                done += 1
            agree = hits / count
            ratio = statistics.median(ratios[e])
            active = tuple(layer for layer in model.exits if layer in thresholds[e])
            parts = cost_breakdown(table, active, exits[e], splits, gated, model.catch_up == "propagate")
            ideal = full_cost / sum(parts.values())
        med = statistics.median(speeds[e])
        rows.append(ProfileRow(e, med, ratio, ideal, agree, dict(sorted(exits[e].items())),
                               bytes_per_token(model, exits[e], None if e is None else thresholds[e], gated) * med / 1e9,
                               {k: v * 1e3 for k, v in parts.items()}, "full" if e is None else "early-exit"))
    return rows



@dataclass
class BatchRow:
    """Aggregate decode throughput of one level at one batch size (`profile_batches`)."""

    batch: int
    epsilon: float | None  # None: the full model
    tokens_per_s: float  # median over rounds of every row's new tokens over the wall time, prefill included
    speedup: float  # median over rounds of this level's tok/s over full mode's at the same batch

    def to_dict(self) -> dict:
        return {"mode": "batch", **asdict(self)}


def profile_batches(model: EarlyExitModel, prompts: Sequence, epsilons: Sequence[float], batches: Sequence[int],
                    tokens: int = 128, rounds: int = 2, metric: str | None = None,
                    progress: Callable[[str, int, int], None] = lambda *a: None) -> list[BatchRow]:
    """Many sequences at once: ``b`` prompts (the given ones in turn) decoded together by the engine for
    each batch size ``b``, full mode and each ε back to back in every round, as `profile_artifact` times
    one sequence. At a batch an exit pays only where the rows that pass it skip work the others' calls
    would not do anyway (`eec.targets.placement` rule 6), so the speedup at 8 rows is not the one at 1."""
    encoded = [model.encode(p) for p in prompts]
    thresholds = {e: model.thresholds_for(e, metric) for e in epsilons}
    levels: list = [None, *epsilons]
    speeds: dict = {(b, e): [] for b in batches for e in levels}
    ratios: dict = {(b, e): [] for b in batches for e in levels}
    total, done = rounds * len(batches) * len(levels), 0
    model.generate(encoded[:2], max_new_tokens=4, mode="full")  # warm-up
    for r in range(rounds):
        for b in batches:
            rows = [encoded[i % len(encoded)] for i in range(b)]
            base = None
            for e in levels:
                progress(f"round {r + 1}: batch {b}, {'full' if e is None else f'ε={e}'}", done, total)
                kwargs = {"mode": "full"} if e is None else {"thresholds": thresholds[e], "metric": metric}
                start = time.perf_counter()
                results = model.generate(rows, max_new_tokens=tokens, ignore_eos=True, max_batch=b, **kwargs)
                speed = sum(len(x.tokens) for x in results) / (time.perf_counter() - start)
                base = speed if e is None else base
                speeds[(b, e)].append(speed)
                ratios[(b, e)].append(speed / base)
                done += 1
    return [BatchRow(b, e, statistics.median(speeds[(b, e)]), statistics.median(ratios[(b, e)]))
            for b in batches for e in levels]

PAYS = 1.05  # a measured speedup below this is within run-to-run noise on a shared CPU: it does not pay


def verdict(rows: Sequence[ProfileRow]) -> list[str]:
    """What the measured rows say a user should run: the best early-exit level beside full mode, or,
    where no exit pays, full mode and the commands that keep only exits that do."""
    full = next((r for r in rows if r.mode == "full" or r.epsilon is None), None)
    if full is None:
        return []
    lines = [f"full mode: {full.tokens_per_s:.1f} tok/s on this machine"]
    levels = [r for r in rows if r.mode == "early-exit" and r.epsilon is not None]
    if not levels and not any(r.mode == "speculative" for r in rows):
        return lines + ["this artifact is the full model (no exits): nothing to choose between"]
    for r in levels:
        lines.append(f"early exit at ε = {r.epsilon}: {r.tokens_per_s:.1f} tok/s, {r.speedup:.2f}x full mode, "
                     f"agreeing with it on {r.agreement:.1%} of tokens")
    spec = next((r for r in rows if r.mode == "speculative"), None)
    if spec is not None:
        lines.append(f"speculative mode (full mode's tokens): {spec.tokens_per_s:.1f} tok/s, {spec.speedup:.2f}x full mode")
    paying = [r for r in levels if r.speedup >= PAYS]
    if spec is not None and spec.speedup >= PAYS and (not paying or spec.speedup >= max(r.speedup for r in paying)):
        lines.append(f"recommended: --mode speculative, {spec.speedup:.2f}x with full mode's tokens")
    elif paying:
        best = max(paying, key=lambda r: r.speedup)
        lines.append(f"recommended: --eps {best.epsilon} ({best.speedup:.2f}x, {best.agreement:.1%} agreement); "
                     "a higher ε agrees more and saves less")
    else:
        lines.append(f"recommended: --mode full: no exit pays on this model and machine (the layers an exit skips "
                     f"cost less than its head and catch-up). `eec compile MODEL --exits auto` keeps only exits that "
                     f"pay, or none; `--precision int4` makes every mode faster on a CPU")
    return lines
