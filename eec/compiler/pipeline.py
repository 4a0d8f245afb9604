"""``compile_model``: source model -> artifact directory, all or nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from eec import __version__
from eec.compiler.export import export_head, export_segment
from eec.compiler.frontends import SourceModel, load_source
from eec.compiler.precision import DEFAULT_BLOCK_SIZE, apply_precision, needs_feeds, record_feeds
from eec.compiler.segments import check_repeats, default_exits, exit_head_weights, plan_segments
from eec.calib.shortlist import rescore, shortlist_ids
from eec.errors import InputError
from eec.calib.calibrate import Progress, calibrate_dir, default_prompts, no_progress, read_prompts
from eec.runtime.manifest import (
    MANIFEST,
    Manifest,
    ModelSpec,
    TokenizerSpec,
    hash_files,
    read_manifest,
    replace_dir,
    write_manifest,
)
from eec.calib.traces import Traces, metric_index
from eec.targets.latency import ModelShape, load_profile, model_table
from eec.targets.placement import describe, place_exits
from eec.targets.profiles import Target, check_precision, get_target



def context_length(config) -> int:
    """Longest sequence the exported graphs reproduce exactly.

    The graphs use full causal attention, so a sliding-window model is exact
    only up to its window.
    """
    length = int(getattr(config, "max_position_embeddings", 0) or 2048)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        length = min(length, int(window))
    return length


def model_spec(src: SourceModel) -> ModelSpec:
    c = src.config
    n_heads = c.num_attention_heads
    return ModelSpec(
        family=c.model_type,
        architecture=type(src.model).__name__,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_heads=n_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // n_heads,
        vocab_size=c.vocab_size,
        context_length=context_length(c),
        source=src.source,
        intermediate_size=c.intermediate_size,
    )


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not (out / MANIFEST).is_file():
        raise InputError(f"{out} exists and is not an eec artifact; refusing to replace it")
    if not out.parent.exists():
        raise InputError(f"output folder {out.parent} does not exist")


def compile_model(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    exits: list[int] | str | None = None,
    target: str = "cpu",
    precision: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    overwrite: bool = False,
    calibrate: bool = True,
    calibration_prompts: Path | None = None,
    calibration_tokens: int = 48,
    calibration_metric: str | None = None,
    placement_eps: float = 0.9,
    profile: Path | None = None,
    shortlist: int | str = 0,
    progress: Progress = no_progress,
) -> Manifest:
    """Compile ``model`` into the artifact directory ``out`` and return its manifest.

    The artifact is built in a temporary directory beside ``out`` and renamed
    into place at the end, so a failure leaves nothing behind. With
    ``calibrate`` (and at least one exit) the built artifact is traced on the
    calibration prompts before it is moved into place (`eec.calib.calibrate`).

    ``exits="auto"`` compiles and calibrates every layer that has a head
    (the checkpoint's trained heads, else quarter depths), then keeps the
    exit set with the lowest expected latency at ``placement_eps`` on the
    target (`eec.targets.placement`), from the measured ``profile`` when
    given, else the target's latency model; the choice is in
    ``manifest.placement``.

    ``shortlist=K`` restricts every exit head to the K tokens the model
    emits most in the calibration generations (`eec.calib.shortlist`);
    ``"auto"`` (with ``exits="auto"``) lets the placement search choose K
    among `shortlist_sizes` and the full vocabulary, by expected latency.
    """
    out = Path(out).absolute()
    tgt = get_target(target)
    precision = check_precision(tgt, precision)
    _check_output(out, overwrite)
    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"--block-size must be a power of two of at least 16, got {block_size}")
    auto = exits == "auto"
    if isinstance(exits, str) and not auto:
        raise InputError(f"exits must be layer numbers or 'auto', got {exits!r}")
    if auto and not calibrate:
        raise InputError("--exits auto needs calibration traces; leave out --no-calibrate")
    if auto and not 0 < placement_eps < 1:
        raise InputError(f"--eps must be between 0 and 1, got {placement_eps}")
    if shortlist == "auto" and not auto:
        raise InputError("--shortlist auto is chosen by the placement search: use it with --exits auto")
    if not (shortlist == "auto" or isinstance(shortlist, int) and shortlist >= 0):
        raise InputError(f"--shortlist must be a number of tokens, 0 (the whole vocabulary) or 'auto', got {shortlist!r}")
    if shortlist and not calibrate:
        raise InputError("a shortlist is built from the calibration generations; leave out --no-calibrate")
    if isinstance(exits, list):
        check_repeats(exits)  # the range needs the model; repeats can be refused before loading it
    if calibrate and calibration_prompts is not None:
        read_prompts(calibration_prompts, has_tokenizer=True)  # unreadable or empty: refuse before the long work
    if calibrate and calibration_metric is not None:
        metric_index(calibration_metric)

    progress("loading model", 0, 1)
    src = load_source(model)
    shape = model_shape(src)
    if isinstance(shortlist, int) and shortlist >= shape.vocab_size:
        raise InputError(f"--shortlist {shortlist} is not smaller than the vocabulary ({shape.vocab_size} tokens)")
    table = None
    if auto:
        table = load_profile(profile, shape, precision) if profile else model_table(tgt, shape, precision)
    layers = default_exits(src) if auto or exits is None else exits
    build = _Build(src, tgt, precision, block_size, calibrate, calibration_prompts, calibration_tokens,
                   calibration_metric, progress, placed=auto)
    tmp = build.run(layers, out.parent)
    try:
        manifest = read_manifest(tmp, verify=False)
        if auto:
            manifest, tmp = _place(build, tmp, manifest, table, placement_eps, out.parent, shortlist)
        elif shortlist and manifest.exits:
            traces = Traces.load(tmp / manifest.calibration.file)
            ids = shortlist_ids(traces.final, shortlist, shape.vocab_size).tolist()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp = build.run(layers, out.parent, ids)
            manifest = read_manifest(tmp, verify=False)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress("done", 1, 1)
    return manifest


def model_shape(src: SourceModel) -> ModelShape:
    m = model_spec(src)
    return ModelShape(m.family, m.num_layers, m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads,
                      m.head_dim, m.vocab_size)


def shortlist_sizes(vocab: int) -> list[int]:
    """The shortlist sizes `--shortlist auto` tries besides the whole vocabulary: 1/2 .. 1/128 of it."""
    return sorted({vocab // d for d in (2, 8, 32, 128)} - {0} if vocab >= 16 else set())


def _place(build: "_Build", tmp: Path, manifest: Manifest, table, eps: float, parent: Path,
           shortlist: int | str) -> tuple[Manifest, Path]:
    """Choose the exit set (and shortlist size) on the candidates' traces; rebuild with them when
    they differ from what was built."""
    traces = Traces.load(tmp / manifest.calibration.file)
    metric, vocab = manifest.calibration.metric, manifest.model.vocab_size
    sizes = [0, *shortlist_sizes(vocab)] if shortlist == "auto" else [shortlist]
    if sizes == [0]:
        placements = {0: place_exits(traces, table, eps, metric)}
    else:
        # Lists come from half the calibration sequences and are judged on the other half: a
        # list built from the tokens it is scored on would always contain their answers.
        fit = traces.sequence % 2 == 0
        held = traces.subset(~fit)
        heads = exit_head_weights(build.src, traces.exits)
        placements = {}
        for k in sizes:
            scored = held if k == 0 else rescore(held, heads, shortlist_ids(traces.final[fit], k, vocab))
            placements[k] = place_exits(scored, table.with_head_fraction(k / vocab if k else 1.0), eps, metric)
    k, placement = min(placements.items(), key=lambda kv: (kv[1].best.expected_s, kv[0] == 0))
    if not placement.best.exits:
        k = 0  # no exit, no head to shortlist
    record = {
        "epsilon": eps,
        "exits": list(placement.best.exits),
        "candidates": list(traces.exits),
        "shortlist": k,
        "predicted_speedup": round(placement.best.speedup, 4),
        "latency_source": f"{table.source} ({table.target}, {table.precision})",
        "ranked": [{"exits": list(c.exits), "shortlist": size, "predicted_speedup": round(c.speedup, 4),
                    "exit_rate": round(c.exit_rate, 4)}
                   for size, c in sorted(((size, c) for size, p in placements.items() for c in p.ranked),
                                         key=lambda sc: sc[1].expected_s)[:8]],
        "report": describe(placement) + ([f"shortlist: {k} tokens" if k else "shortlist: none (whole vocabulary)"]
                                         if len(sizes) > 1 else []),
    }
    ids = shortlist_ids(traces.final, k, vocab).tolist() if k else None
    if list(placement.best.exits) != list(traces.exits) or ids is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp = build.run(list(placement.best.exits), parent, ids)
    manifest = replace(read_manifest(tmp, verify=False), placement=record)
    write_manifest(tmp, manifest)
    return manifest, tmp


@dataclass
class _Build:
    """Export, quantize and (optionally) calibrate one exit set into a fresh staging directory."""

    src: SourceModel
    target: Target
    precision: str
    block_size: int
    calibrate: bool
    prompts: Path | None
    tokens: int
    metric: str | None
    progress: Progress
    placed: bool  # --exits auto: the exit set may leave trained heads out

    def run(self, exits: list[int], parent: Path, shortlist: list[int] | None = None) -> Path:
        src, progress = self.src, self.progress
        plan = plan_segments(src, exits, fused=self.target.fused_ops, context=context_length(src.config),
                             all_heads=not self.placed, shortlist=shortlist)
        graphs = [seg.spec.file for seg in plan.segments] + [head.file for head in plan.heads]
        total = len(graphs) + 3 + int(self.calibrate)
        step = 1
        tmp = Path(tempfile.mkdtemp(prefix=".eec-build-", dir=parent))
        try:
            for seg in plan.segments:
                progress(f"exporting layers {seg.spec.start}-{seg.spec.stop}", step, total)
                export_segment(seg, tmp)
                step += 1
            for head in plan.heads:
                progress(f"exporting {head.file}", step, total)
                export_head(head, tmp)
                step += 1
            manifest = self._manifest(tmp, plan, "fp32")
            if self.precision != "fp32":
                progress(f"converting to {self.precision}", step, total)
                feeds = {}
                if needs_feeds(self.precision, self.target.backend):
                    write_manifest(tmp, manifest)
                    has_tok = src.tokenizer is not None
                    prompts = (read_prompts(self.prompts, has_tok) if self.prompts
                               else default_prompts(has_tok, src.config.vocab_size))
                    feeds = record_feeds(tmp, prompts[:8])
                for file in graphs:
                    apply_precision(tmp / file, self.precision, self.block_size, self.target.backend, feeds.get(file))
                manifest = self._manifest(tmp, plan, self.precision)
            step += 1
            progress("writing manifest", step, total)
            write_manifest(tmp, manifest)
            if self.calibrate and manifest.exits:
                calibrate_dir(tmp, self.prompts, self.tokens, self.metric,
                              progress=lambda what, done, n: progress(f"calibrating: {what}", step + 1, total))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def _manifest(self, tmp: Path, plan, precision: str) -> Manifest:
        src = self.src
        tokenizer = None
        if src.tokenizer is not None:
            (tmp / "tokenizer.json").write_text(src.tokenizer.json, encoding="utf-8")
            t = src.tokenizer
            tokenizer = TokenizerSpec("tokenizer.json", t.chat_template, t.bos_token, t.eos_token)
        (tmp / MANIFEST).unlink(missing_ok=True)
        return Manifest(
            model=model_spec(src),
            segments=[p.spec for p in plan.segments],
            precision=precision,
            target=self.target.name,
            eos_token_ids=src.eos_token_ids,
            tokenizer=tokenizer,
            files=hash_files(tmp),
            eec_version=__version__,
        )
