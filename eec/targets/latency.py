"""Latency tables: what a segment (a layer range) and an exit head cost on a target.

A table comes from one of two places:

1. `model_table`: a roofline estimate from the target's figures. A layer
   reads its weights once per call and does 2 × parameters × tokens
   operations, so its time is the larger of bytes / bandwidth and
   operations / peak, plus the target's fixed per-layer floor (kernel
   latencies); a head likewise; every graph call adds the per-call overhead.
2. `measured_table` / `eec targets measure`: times measured on the device for
   each segment of one or more compiled artifacts at 1..8 tokens per call,
   and for each head. A measured range is used as measured; another costs
   the fewest measured segments that chain into it, less the fixed cost per
   segment call saved by running them as one graph (``segment_overhead``,
   fitted where one measured range is the chain of others: on small models
   it is most of a layer's time).

Costs are seconds per call. numpy-free and torch-free: the runtime side can read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from eec.errors import InputError
from eec.targets.profiles import Target

MAX_SEQ = 8  # calls of 1..8 tokens: one new token plus up to 7 pending (catch-up)
# Weight-only formats add a fp32 scale per block of 32.
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0 + 4.0 / 32, "int8-dynamic": 1.0, "int4": 0.5 + 4.0 / 32,
                    "int4-gguf": 0.5 + 8.0 / 32}  # + the fp32 block minima of the carried products


@dataclass(frozen=True)
class ModelShape:
    """What the latency of a decoder depends on; also the key that ties a measured profile to its model."""

    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def layer_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        return attn + 3 * self.hidden_size * self.intermediate_size

    @property
    def head_params(self) -> int:
        return self.hidden_size * self.vocab_size


@dataclass
class LatencyTable:
    shape: ModelShape
    precision: str
    target: str
    source: str  # "model" or "measured"
    call_overhead: float
    segments: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # (start, stop) -> s at seq 1..8
    heads: dict[int, float] = field(default_factory=dict)  # exit layer -> s per call
    final_head: float = 0.0  # the model's own head, inside the last segment
    layer: list[float] = field(default_factory=list)  # one layer at seq 1..8 (model tables)
    layer_floor: float = 0.0  # the fixed part of a layer's or head's time (model tables)
    head_fraction: float = 1.0  # exit heads project onto this share of the vocabulary (shortlists)
    # Fixed cost of one segment call (binding, graph entry and exit nodes, thread wake-ups), fitted from
    # measured ranges that chain into another measured range; 0: not fitted, call_overhead stands in.
    segment_overhead: float = 0.0
    # KV fill graphs (`--catch-up propagate`), measured like the segments: (start, stop) -> s at seq 1..8.
    fills: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    # Segments with their exit head inside (`--fuse-heads`), one position: (start, stop) -> s. Early-exit
    # decoding runs them in place of the segment and its head (one call instead of two).
    with_head: dict[tuple[int, int], float] = field(default_factory=dict)
    # The last segment's verify graph (speculative mode: the final head at every position), measured
    # like the segments: (start, stop) -> s at seq 1..8.
    verifies: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    # Segments over a batch's decode step (`eec targets measure --batch B`): (start, stop) -> {rows: s of
    # one call over that many rows at one position each}. Where a batch size is missing, `rows_cost`
    # falls back to one row's call over as many positions.
    rows: dict[tuple[int, int], dict[int, float]] = field(default_factory=dict)
    # eec's host work in a decode step outside its graph calls (`eec targets measure`, CPU): rows ->
    # seconds (a step's fixed part, each segment call, each exit asked), fitted by `fit_host` from
    # ``host_samples``: [rows, segments, exits, full mode's step, a step with every exit asked]. Empty in
    # profiles measured before, and in model tables: placement then prices the graphs alone.
    host: dict[int, list[float]] = field(default_factory=dict)
    host_samples: list[list[float]] = field(default_factory=list)

    def host_cost(self, rows: int) -> tuple[float, float, float]:
        """(step, call, exit) host seconds for a step of ``rows`` sequences: as fitted for the nearest
        number of rows measured at or below it (one row, or the profile's batch), zeros where none was."""
        measured = [n for n in self.host if n <= rows] or sorted(self.host)[:1]
        return tuple(self.host[max(measured)]) if measured else (0.0, 0.0, 0.0)

    def range_cost(self, start: int, stop: int, seq: int = 1) -> float:
        """One call running layers [start, stop) over ``seq`` tokens; a range that ends at the
        last layer includes the final head (so does the measured last segment)."""
        seq = min(max(seq, 1), MAX_SEQ)
        if self.source == "model":
            final = self.final_head if stop == self.shape.num_layers else 0.0
            return self.call_overhead + (stop - start) * self.layer[seq - 1] + final
        parts = _cover(sorted(self.segments), start, stop)
        saved = self.segment_overhead or self.call_overhead
        return sum(self.segments[p][seq - 1] for p in parts) - (len(parts) - 1) * saved

    def rows_cost(self, start: int, stop: int, rows: int) -> float:
        """One call running layers [start, stop) for ``rows`` sequences at one position each (a batch's
        decode step): measured where the profile has that many rows for segments that chain over the
        range (`has_rows`), else priced as one sequence's call over as many positions, past `MAX_SEQ`
        by the slope from 2 to 8. That stand-in is cheap: on the code model (8 layers, hidden 256, 150
        cached positions, 2 cores) 8 rows at one position cost 1.43-1.52x one row at 8 positions (each
        row reads its own cache, and the final head's top-k runs per row)."""
        parts = self._rows_parts(start, stop, rows) if rows > 1 else None
        if parts is not None:
            saved = self.segment_overhead or self.call_overhead
            return sum(self.rows[p][rows] for p in parts) - (len(parts) - 1) * saved
        return self.positions_cost(start, stop, rows)

    def positions_cost(self, start: int, stop: int, seq: int) -> float:
        """One call running layers [start, stop) for one sequence over ``seq`` positions (a catch-up):
        as `range_cost` up to `MAX_SEQ`, past it by the slope from 2 to `MAX_SEQ` (layers 2-8 of the
        code model over 16-64 positions came within 5% of that slope)."""
        if seq <= MAX_SEQ:
            return self.range_cost(start, stop, seq)
        top = self.range_cost(start, stop, MAX_SEQ)
        slope = max((top - self.range_cost(start, stop, 2)) / (MAX_SEQ - 2), 0.0)
        return top + (seq - MAX_SEQ) * slope

    def has_rows(self, start: int, stop: int, rows: int) -> bool:
        """Whether segments measured at ``rows`` rows chain over layers [start, stop)."""
        return self._rows_parts(start, stop, rows) is not None

    def _rows_parts(self, start: int, stop: int, rows: int) -> list[tuple[int, int]] | None:
        try:
            return _cover(sorted(p for p, by_rows in self.rows.items() if rows in by_rows), start, stop)
        except InputError:
            return None

    def fill_costs(self, start: int, stop: int) -> tuple[float, float] | None:
        """(fixed, per position) seconds of filling layers [start, stop)'s KV for exited positions in
        one call, from the measured fill graphs; None where they do not cover the range."""
        try:
            parts = _cover(sorted(self.fills), start, stop)
        except InputError:
            return None
        saved = (len(parts) - 1) * (self.segment_overhead or self.call_overhead)
        one, two = (sum(self.fills[p][n] for p in parts) - saved for n in (0, 1))
        per_position = max(two - one, 0.0)
        return max(one - per_position, 0.0), per_position

    def verify_cost(self, start: int, stop: int, seq: int) -> float:
        """Speculative mode's verify: layers [start, stop) over ``seq`` drafted positions in one call,
        the last segment through its verify graph where it was measured (the final head at every
        position costs more than at the last one alone), the plain segment otherwise."""
        cost = self.range_cost(start, stop, seq)
        seq = min(max(seq, 1), MAX_SEQ)
        for (a, b), times in self.verifies.items():
            if b == stop and start <= a and (a, b) in self.segments:
                cost += max(times[seq - 1] - self.segments[(a, b)][seq - 1], 0.0)
                break
        return cost

    def head_cost(self, layer: int) -> float:
        """One exit head call; a shortlist scales the part that is not fixed overhead."""
        if layer in self.heads:
            fixed = self.call_overhead
            return fixed + (self.heads[layer] - fixed) * self.head_fraction
        if self.source == "model":
            fixed = self.call_overhead + self.layer_floor
            return fixed + (self.final_head - self.layer_floor) * self.head_fraction
        raise InputError(f"the latency profile has no head at layer {layer}; measure an artifact with that exit")

    def exit_cost(self, start: int, stop: int) -> float:
        """What asking for the exit at ``stop`` adds to the segment [start, stop)'s one-position call:
        the head's call, or, where that segment was measured with its head inside, that call
        over the plain one (a shortlist scales either, as `head_cost`)."""
        if (start, stop) not in self.with_head:
            return self.head_cost(stop)
        return max(self.with_head[(start, stop)] - self.range_cost(start, stop, 1), 0.0) * self.head_fraction

    def with_head_fraction(self, fraction: float) -> "LatencyTable":
        return replace(self, head_fraction=fraction)

    def to_json(self) -> str:
        d = asdict(self)
        d["segments"] = [{"start": a, "stop": b, "seconds": v} for (a, b), v in self.segments.items()]
        d["heads"] = {str(k): v for k, v in self.heads.items()}
        d["fills"] = [{"start": a, "stop": b, "seconds": v} for (a, b), v in self.fills.items()]
        d["with_head"] = [{"start": a, "stop": b, "seconds": v} for (a, b), v in self.with_head.items()]
        d["verifies"] = [{"start": a, "stop": b, "seconds": v} for (a, b), v in self.verifies.items()]
        d["rows"] = [{"start": a, "stop": b, "seconds": {str(n): t for n, t in v.items()}} for (a, b), v in self.rows.items()]
        d["host"] = {str(n): v for n, v in self.host.items()}
        return json.dumps(d, indent=2)

    @staticmethod
    def from_json(text: str) -> "LatencyTable":
        d = json.loads(text)
        d["shape"] = ModelShape(**d["shape"])
        d["segments"] = {(s["start"], s["stop"]): s["seconds"] for s in d["segments"]}
        d["heads"] = {int(k): v for k, v in d["heads"].items()}
        d["fills"] = {(s["start"], s["stop"]): s["seconds"] for s in d.get("fills", [])}
        # "fused": what earlier profiles called it
        d["with_head"] = {(s["start"], s["stop"]): s["seconds"] for s in d.get("with_head", d.pop("fused", []))}
        d["verifies"] = {(s["start"], s["stop"]): s["seconds"] for s in d.get("verifies", [])}
        d["rows"] = {(s["start"], s["stop"]): {int(n): t for n, t in s["seconds"].items()} for s in d.get("rows", [])}
        d["host"] = {int(n): list(v) for n, v in d.get("host", {}).items()}
        return LatencyTable(**d)


def _cover(parts: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """The fewest measured segments that chain from ``start`` to ``stop``."""
    best: dict[int, list[tuple[int, int]]] = {start: []}
    for layer in range(start, stop):  # segments only run forwards, so one pass in layer order settles each
        if layer not in best:
            continue
        for a, b in parts:
            if a == layer and b <= stop and (b not in best or len(best[layer]) + 1 < len(best[b])):
                best[b] = best[layer] + [(a, b)]
    if stop not in best:
        raise InputError(f"the latency profile cannot cover layers {start}-{stop}: its segments are {parts}")
    return best[stop]


def fit_segment_overhead(segments: dict[tuple[int, int], list[float]]) -> float:
    """Mean fixed cost per segment call at one token: for each measured range that is also a chain of
    k > 1 shorter measured ranges, (sum of the chain - the range) / (k - 1). 0 when no range is, or
    when the chains cost no more than the ranges (`segment_chains` tells the two apart)."""
    fits = _chain_fits(segments)
    return max(sum(fits) / len(fits), 0.0) if fits else 0.0


def segment_chains(segments: dict[tuple[int, int], list[float]]) -> int:
    """How many measured ranges are also a chain of shorter measured ranges: what the fixed cost per
    segment call is fitted from (none: an artifact without exits was not measured beside one with)."""
    return len(_chain_fits(segments))


def _chain_fits(segments: dict[tuple[int, int], list[float]]) -> list[float]:
    fits = []
    for (a, b), times in segments.items():
        shorter = sorted(k for k in segments if k != (a, b) and a <= k[0] and k[1] <= b)
        try:
            chain = _cover(shorter, a, b)
        except InputError:
            continue
        fits.append((sum(segments[p][0] for p in chain) - times[0]) / (len(chain) - 1))
    return fits


def fit_host(samples: list[list[float]]) -> dict[int, list[float]]:
    """(step, call, exit) host seconds by rows from ``LatencyTable.host_samples``: a step with every exit
    asked costs full mode's plus one decision per exit; full mode's step is a fixed part plus one part
    per segment call, the line through the artifacts' (segments, seconds) where their segment counts
    differ (an artifact cut at every exit and one without exits), else all of it per call."""
    host = {}
    for rows in sorted({int(s[0]) for s in samples}):
        mine = [s for s in samples if int(s[0]) == rows]
        asked = [(s[4] - s[3]) / s[2] for s in mine if s[2]]
        exit_s = max(sum(asked) / len(asked), 0.0) if asked else 0.0
        counts = [s[1] for s in mine]
        if len(set(counts)) > 1:
            mx, my = sum(counts) / len(mine), sum(s[3] for s in mine) / len(mine)
            slope = sum((s[1] - mx) * (s[3] - my) for s in mine) / sum((s[1] - mx) ** 2 for s in mine)
            call_s = max(slope, 0.0)
            step_s = max(my - call_s * mx, 0.0)
        else:
            step_s, call_s = 0.0, sum(s[3] / s[1] for s in mine) / len(mine)
        host[rows] = [step_s, call_s, exit_s]
    return host


def model_table(target: Target, shape: ModelShape, precision: str) -> LatencyTable:
    bpw = BYTES_PER_WEIGHT[precision]
    peak, bandwidth = target.peak_ops(precision), target.bandwidth_gbs * 1e9

    floor = target.layer_floor_us * 1e-6

    def roofline(params: int, seq: int) -> float:
        return floor + max(params * bpw / bandwidth, 2.0 * params * seq / peak)

    layer = [roofline(shape.layer_params, s) for s in range(1, MAX_SEQ + 1)]
    return LatencyTable(shape, precision, target.name, "model", target.call_overhead_us * 1e-6,
                        layer=layer, final_head=roofline(shape.head_params, 1), layer_floor=floor)


def load_profile(path: Path, shape: ModelShape, precision: str) -> LatencyTable:
    """A measured table, refused when it was measured for another model or precision."""
    try:
        table = LatencyTable.from_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a readable latency profile ({e})") from None
    if table.shape != shape:
        raise InputError(f"{path} was measured for another model ({table.shape.family}, {table.shape.num_layers} "
                         f"layers, hidden {table.shape.hidden_size}); measure this one with `eec targets measure`")
    if table.precision != precision:
        raise InputError(f"{path} was measured at {table.precision}, not {precision}")
    return table
