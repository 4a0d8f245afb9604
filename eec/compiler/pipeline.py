"""``compile_model``: source model -> artifact directory, all or nothing."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from eec import __version__
from eec.compiler.export import export_fill, export_head, export_segment, export_verify
from eec.compiler.frontends import SourceModel, load_source
from eec.compiler.weights import store_once
from eec.compiler.precision import DEFAULT_BLOCK_SIZE, apply_precision, needs_feeds, record_feeds, write_with_head
from eec.compiler.segments import GRAPHS, check_repeats, default_exits, exit_head_weights, plan_segments
from eec.calib.shortlist import rescore, shortlist_ids
from eec.errors import InputError
from eec.calib.calibrate import (
    Progress,
    calibrate_dir,
    collect_traces,
    default_prompts,
    no_progress,
    packaged_prompts,
    read_prompts,
)
from eec.runtime.core import CATCH_UPS
from eec.runtime.manifest import (
    FILL,
    MANIFEST,
    VERIFY,
    WITH_HEAD,
    Manifest,
    ModelSpec,
    TokenizerSpec,
    hash_files,
    replace_dir,
    write_manifest,
)
from eec.calib.traces import Traces, metric_index
from eec.runtime.staging import check_output, new_stage, output_lock
from eec.targets.latency import ModelShape, load_profile, model_table
from eec.targets.placement import TOLERANCE, describe, evaluate, place_exits
from eec.targets.profiles import Target, check_precision, get_target
from eec.train.classifier import train_classifiers, with_classifier_scores



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


@dataclass(frozen=True)
class CompileOptions:
    """What `compile_model` builds from a model, besides where it writes it: checked at once (`check`),
    before the model is loaded, then carried whole by the build (`_Build`) and the placement after it.

    ``exits``: layer numbers, ``[]`` for the full model alone, None for the checkpoint's trained heads (else
    quarter depths), or ``"auto"`` to compile and calibrate every
    candidate layer (``candidates``: a list, ``"all"`` for every layer, or by default the checkpoint's
    trained heads, else quarter depths) and keep the exit set with the lowest expected latency at
    ``placement_eps`` on the target (`eec.targets.placement`), from the measured ``profile`` when given,
    else the target's latency model; the choice is in ``manifest.placement``. ``placement_batch``: price
    it for that many sequences decoded at once (a server's batch; `eec.targets.placement` rule 6), where
    an exit most rows pass now and then saves nothing.

    ``calibrate``: trace the built artifact on ``calibration_prompts`` (eec's own set by default),
    ``calibration_tokens`` new tokens each, before it is moved into place (`eec.calib.calibrate`);
    ``calibration_metric`` fixes the confidence metric (default: the one that exits most at ε = 0.9).

    ``shortlist=K`` restricts every exit head to the K tokens the model emits most in the calibration
    generations (`eec.calib.shortlist`); ``"auto"`` (with ``exits="auto"``) lets the placement search
    choose K among `shortlist_sizes` and the full vocabulary, by expected latency.

    ``exit_classifier`` trains a small classifier per exit on the traces (`eec.train.classifier`) and
    puts it inside the segment: the exit head then runs only for tokens the classifier lets leave, and
    the artifact's thresholds apply to its score (metric ``classifier``).

    ``catch_up="propagate"`` adds a key/value fill graph to every segment after the first
    (`eec.compiler.modules.KVFill`) and makes the runtime fill deeper layers' KV of exited positions from
    the exit's hidden state (CALM's state propagation) instead of running those layers: cheaper, not
    exact (`eec.runtime.core`). Calibration is unchanged.

    ``fuse_heads`` ("auto", "on", "off"): also write each exit segment's graph with its exit head inside
    (`eec.compiler.passes.FuseExitHead`), which early-exit decoding runs in one call instead of two. It
    costs a second copy of the segment's weights on disk, so "auto" does it for segments of at most
    `FUSE_LIMIT` bytes, where a call's fixed cost is a visible share; never with exit classifiers (their
    head runs only for tokens that leave).

    ``speculative`` ("auto", "on", "off"): also write the last segment's verify graph (the token at every
    position), which speculative decoding needs (`eec.runtime.speculative`); "auto" where the artifact
    has exits and the last segment is at most `FUSE_LIMIT` bytes in fp32, as for ``fuse_heads``.
    """

    exits: list[int] | str | None = None
    target: str = "cpu"
    precision: str | None = None  # None: the target's
    block_size: int = DEFAULT_BLOCK_SIZE
    calibrate: bool = True
    calibration_prompts: Path | None = None
    calibration_tokens: int = 48
    calibration_metric: str | None = None
    placement_eps: float = 0.9
    placement_batch: int = 1
    profile: Path | None = None
    shortlist: int | str = 0
    exit_classifier: bool = False
    candidates: list[int] | str | None = None
    catch_up: str = "exact"
    fuse_heads: str = "auto"
    speculative: str = "auto"

    @property
    def auto(self) -> bool:
        """Whether the placement chooses the exits."""
        return self.exits == "auto"

    def check(self) -> None:
        """Refuse bad options before the long work (the layers' range needs the model: `plan_segments`)."""
        auto = self.auto
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"--block-size must be a power of two of at least 16, got {self.block_size}")
        if isinstance(self.exits, str) and not auto:
            raise InputError(f"exits must be layer numbers or 'auto', got {self.exits!r}")
        if auto and not self.calibrate:
            raise InputError("--exits auto needs calibration traces; leave out --no-calibrate")
        if auto and not 0 < self.placement_eps < 1:
            raise InputError(f"--eps must be between 0 and 1, got {self.placement_eps}")
        if self.shortlist == "auto" and not auto:
            raise InputError("--shortlist auto is chosen by the placement search: use it with --exits auto")
        if not (self.shortlist == "auto" or isinstance(self.shortlist, int) and self.shortlist >= 0):
            raise InputError(f"--shortlist must be a number of tokens, 0 (the whole vocabulary) or 'auto', "
                             f"got {self.shortlist!r}")
        if self.shortlist and not self.calibrate:
            raise InputError("a shortlist is built from the calibration generations; leave out --no-calibrate")
        if self.exit_classifier and not self.calibrate:
            raise InputError("exit classifiers are trained on the calibration traces; leave out --no-calibrate")
        if self.calibrate and (not isinstance(self.calibration_tokens, int) or isinstance(self.calibration_tokens, bool)
                               or self.calibration_tokens < 2):
            raise InputError(f"--calibration-tokens must be a whole number of at least 2, got {self.calibration_tokens!r}")
        batch = self.placement_batch
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise InputError(f"--batch must be a whole number of at least 1, got {batch!r}")
        if batch > 1 and not auto:
            raise InputError("--batch prices the --exits auto placement for a batch: use it with --exits auto")
        if batch > 1 and self.catch_up == "propagate":
            raise InputError("--batch prices the exact catch-up (exited rows ride deeper rows' calls); "
                             "with --catch-up propagate place for one sequence")
        if self.catch_up not in CATCH_UPS:
            raise InputError(f"--catch-up must be one of {', '.join(CATCH_UPS)}, got {self.catch_up!r}")
        if self.fuse_heads not in FUSE_HEADS:
            raise InputError(f"--fuse-heads must be one of {', '.join(FUSE_HEADS)}, got {self.fuse_heads!r}")
        if self.speculative not in FUSE_HEADS:
            raise InputError(f"--speculative must be one of {', '.join(FUSE_HEADS)}, got {self.speculative!r}")
        if self.candidates is not None and not auto:
            raise InputError("--candidates are the layers --exits auto chooses among: use them with --exits auto")
        if isinstance(self.candidates, str) and self.candidates != "all":
            raise InputError(f"--candidates must be layer numbers or 'all', got {self.candidates!r}")
        if isinstance(self.exits, list):
            check_repeats(self.exits)  # the range needs the model; repeats can be refused before loading it
        if self.calibrate and self.calibration_prompts is not None:
            read_prompts(self.calibration_prompts, has_tokenizer=True)  # unreadable or empty: refuse now
        if self.calibrate and self.calibration_metric is not None:
            metric_index(self.calibration_metric)


def compile_model(model: str | os.PathLike, out: str | os.PathLike, options: CompileOptions | None = None, *,
                  overwrite: bool = False, progress: Progress = no_progress, **changes) -> Manifest:
    """Compile ``model`` into the artifact directory ``out`` and return its manifest.

    What is built is ``options`` (`CompileOptions`, its defaults when None) with ``changes``, its fields
    by name: ``compile_model(src, out, exits=[8, 16], precision="int4")``. The artifact is built in a
    temporary directory beside ``out`` and renamed into place at the end, so a failure leaves nothing
    behind; an existing ``out`` is replaced only with ``overwrite``.
    """
    options = replace(options or CompileOptions(), **changes)
    out = Path(out).absolute()
    tgt = get_target(options.target, placed=options.auto)
    precision = check_precision(tgt, options.precision)
    check_output(out, overwrite)
    options.check()

    with output_lock(out):  # one writer per output; killed writers' staging folders removed
        check_output(out, overwrite)  # again under the lock: another writer may have finished meanwhile
        progress("loading model", 0, 1)
        src = load_source(model)
        shape = model_shape(src)
        shortlist = options.shortlist
        if isinstance(shortlist, int) and shortlist >= shape.vocab_size:
            raise InputError(f"--shortlist {shortlist} is not smaller than the vocabulary ({shape.vocab_size} tokens)")
        table = None
        if options.auto:
            table = (load_profile(options.profile, shape, precision) if options.profile
                     else model_table(tgt, shape, precision))
        candidates = options.candidates
        if candidates == "all":
            candidates = list(range(1, shape.num_layers))
        exits = options.exits
        layers = (candidates or default_exits(src)) if options.auto else default_exits(src) if exits is None else exits
        build = _Build(src, tgt, precision, options, progress)
        staged = build.run(layers, out)
        try:
            if options.auto or (shortlist or options.exit_classifier) and staged.manifest.exits:
                staged = _refine(build, staged, layers, table, out)
            replace_dir(staged.path, out)
        except BaseException:
            shutil.rmtree(staged.path, ignore_errors=True)
            raise
        progress("done", 1, 1)
        return staged.manifest


def model_shape(src: SourceModel) -> ModelShape:
    m = model_spec(src)
    return ModelShape(m.family, m.num_layers, m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads,
                      m.head_dim, m.vocab_size)


def shortlist_sizes(vocab: int) -> list[int]:
    """The shortlist sizes `--shortlist auto` tries besides the whole vocabulary: 1/2 .. 1/128 of it."""
    return sorted({vocab // d for d in (2, 8, 32, 128)} - {0} if vocab >= 16 else set())


FUSE_HEADS = ("auto", "on", "off")
FUSE_LIMIT = 64 << 20  # bytes of a segment's graph and weights up to which --fuse-heads auto fuses its head

CLASSIFIER_TOKENS = 96  # per training prompt: ~5k tokens for eec's 60 prompts


def classifier_traces(root: Path, src: SourceModel) -> Traces:
    """Traces of the artifact at ``root`` on eec's training prompts (random ids without a
    tokenizer): the exit classifiers' training data, disjoint from the calibration prompts."""
    from eec.runtime import load

    model = load(root, verify=False)
    if src.tokenizer is not None:
        prompts = packaged_prompts("eec.train")
    else:
        rng = np.random.default_rng(1)  # default_prompts uses seed 0
        prompts = [rng.integers(0, src.config.vocab_size, size=8).tolist() for _ in range(48)]
    return collect_traces(model, prompts, CLASSIFIER_TOKENS)


def _refine(build: "_Build", staged: "Staged", layers: list[int], table, out: Path) -> "Staged":
    """After the first build and its calibration: choose the exit set (with ``table``), the
    shortlist and train exit classifiers on the traces, then rebuild with them.

    Shortlists are fitted on the even-numbered calibration sequences and judged on the odd
    ones. Exit classifiers are trained on traces of another prompt set (eec's training
    prompts, `classifier_traces`), so every calibration token is one they never saw.
    """
    manifest, traces = staged.manifest, staged.traces
    opt = build.options
    eps, shortlist, classifier = opt.placement_eps, opt.shortlist, opt.exit_classifier
    vocab = manifest.model.vocab_size
    auto = table is not None
    split = shortlist == "auto"
    fit = traces.sequence % 2 == 0 if split else np.ones(len(traces), dtype=bool)
    training = classifier_traces(staged.path, build.src) if classifier else None
    metric = "classifier" if classifier else manifest.calibration.metric
    heads = exit_head_weights(build.src, traces.exits) if shortlist else None
    sizes = [0, *shortlist_sizes(vocab)] if shortlist == "auto" else [int(shortlist)]
    options = {}
    for k in sizes:
        ids = shortlist_ids(traces.final[fit], k, vocab) if k else None
        scored = traces if ids is None else rescore(traces, heads, ids)
        classifiers = None
        if classifier:  # labels depend on the list: the classifier learns the shortlisted head's agreement
            classifiers = train_classifiers(training if ids is None else rescore(training, heads, ids))
        if classifiers:
            scored = with_classifier_scores(scored, classifiers)
        placement = None
        if auto:
            judged = scored.subset(~fit) if split else scored
            placement = place_exits(judged, table.with_head_fraction(k / vocab if k else 1.0), eps, metric,
                                    propagate=opt.catch_up == "propagate", batch=opt.placement_batch)
        options[k] = (placement, classifiers, ids)
    if auto:  # placement's rule 5 across list sizes too: near the cheapest, the fewest exits
        cheapest = min(options[size][0].best.expected_s for size in options)
        near = [size for size in options if options[size][0].best.expected_s <= cheapest * (1 + TOLERANCE)]
        k = min(near, key=lambda size: (len(options[size][0].best.exits), options[size][0].best.expected_s))
    else:
        k = sizes[0]
    placement, classifiers, ids = options[k]
    exits = list(placement.best.exits) if auto else list(layers)
    if not exits:
        k, classifiers, ids = 0, None, None  # no exit: nothing to shortlist or classify
    record = None
    if auto:
        others = ((size, c) for size, (p, _, _) in options.items() for c in p.ranked if (size, c) != (k, placement.best))
        ranked = [(k, placement.best), *sorted(others, key=lambda sc: sc[1].expected_s)]  # the chosen set first
        record = {
            "epsilon": eps,
            "batch": opt.placement_batch,
            "exits": exits,
            "candidates": list(traces.exits),
            "shortlist": k,
            "exit_classifier": classifiers is not None,
            "predicted_speedup": round(placement.best.speedup, 4),
            "latency_source": f"{table.source} ({table.target}, {table.precision})",
            "ranked": [{"exits": list(c.exits), "shortlist": size, "predicted_speedup": round(c.speedup, 4),
                        "exit_rate": round(c.exit_rate, 4)} for size, c in ranked[:8]],
            "report": describe(placement) + ([f"shortlist: {k} tokens" if k else "shortlist: none (whole vocabulary)"]
                                             if len(sizes) > 1 else []),
        }
        batch = opt.placement_batch
        if batch > 1 and not table.has_rows(0, table.shape.num_layers, batch):
            record["report"].append(
                f"the latency table holds no calls over {batch} sequences: a step is priced as one sequence's "
                f"call over {batch} positions, which costs less (`eec targets measure --batch {batch}`)")
    if exits != list(traces.exits) or ids is not None or classifiers:
        shutil.rmtree(staged.path, ignore_errors=True)
        chosen = {layer: classifiers[layer] for layer in exits} if classifiers else None
        staged = build.run(exits, out, None if ids is None else ids.tolist(), chosen,
                           metric="classifier" if chosen else None)
        if record is not None and exits:
            staged = _check_built(build, staged, record, table.with_head_fraction(k / vocab if k else 1.0), out)
    if record is not None:
        staged.manifest = replace(staged.manifest, placement=record)
        write_manifest(staged.path, staged.manifest)
    return staged


def _check_built(build: "_Build", staged: "Staged", record: dict, table, out: Path) -> "Staged":
    """Price the built artifact on its own calibration traces, which is what its thresholds come from.

    The search priced candidates on the candidate build's traces, rescored in fp32 for a shortlist;
    the built heads are quantized, and their thresholds can differ (a 12-layer code model's second
    exit was priced at 94% of tokens leaving and built with a threshold no token met). The record's
    ``predicted_speedup`` becomes the built artifact's (the search's is kept beside it); an artifact
    predicted slower than the full model once built is replaced by the full model.
    """
    exits = tuple(record["exits"])
    opt = build.options
    built = evaluate(staged.traces, table, exits, opt.placement_eps, staged.manifest.calibration.metric,
                     "risk", 0.1, propagate=opt.catch_up == "propagate", batch=opt.placement_batch)
    record["search_predicted_speedup"] = record["predicted_speedup"]
    record["predicted_speedup"] = round(built.speedup, 4)
    record["report"].append(f"built: on its own traces, exits {','.join(map(str, exits))} predict {built.speedup:.2f}x, "
                            f"{built.exit_rate:.0%} of tokens exit ({dict(sorted(built.exits_taken.items()))})")
    if built.speedup >= 1.0:
        return staged
    record.update(exits=[], shortlist=0, exit_classifier=False, predicted_speedup=1.0)
    record["report"].append("no exit pays here once built: the full model is written instead")
    shutil.rmtree(staged.path, ignore_errors=True)
    return build.run([], out)


def stored_order(plan) -> list[str]:
    """The plan's graphs by name inside `GRAPHS`: plain segments first, so that the first copy of a
    weight, which the others refer to, is the one full mode reads."""
    files = [seg.spec.file for seg in plan.segments]
    files += [f for seg in plan.segments for f in seg.spec.graphs.values() if f not in files]
    files += [h.file for h in plan.heads]
    prefix = f"{GRAPHS}/"
    assert all(f.startswith(prefix) and "/" not in f[len(prefix):] for f in files), files
    return [f[len(prefix):] for f in files]


@dataclass
class Staged:
    """A build in its staging folder, with the manifest written there and, where it was calibrated,
    the traces stored beside it: what the placement and the checks after a build read, in memory."""

    path: Path
    manifest: Manifest
    traces: Traces | None = None


@dataclass
class _Build:
    """Export, quantize and (optionally) calibrate one exit set into a fresh staging directory."""

    src: SourceModel
    target: Target
    precision: str  # the options' precision, or the target's default
    options: CompileOptions
    progress: Progress

    def run(self, exits: list[int], out: Path, shortlist: list[int] | None = None,
            classifiers: dict | None = None, metric: str | None = None) -> Staged:
        src, progress, opt = self.src, self.progress, self.options
        plan = plan_segments(src, exits, contrib_ops=self.target.contrib_ops, context=context_length(src.config),
                             all_heads=not opt.auto, shortlist=shortlist, classifiers=classifiers,
                             fills=opt.catch_up == "propagate", verify=opt.speculative != "off")
        fills = {seg.spec.graph(FILL): seg.spec.file for seg in plan.segments if seg.fill is not None}
        verifies = {seg.spec.graph(VERIFY): seg.spec.file for seg in plan.segments if seg.verify is not None}
        total = len(plan.segments) + len(fills) + len(verifies) + len(plan.heads) + 4 + int(opt.calibrate)
        step = 1
        tmp = new_stage(out, "build")
        try:
            for seg in plan.segments:
                progress(f"exporting layers {seg.spec.start}-{seg.spec.stop}", step, total)
                export_segment(seg, tmp)
                step += 1
                if seg.fill is not None:
                    progress(f"exporting the key/value fill of layers {seg.spec.start}-{seg.spec.stop}", step, total)
                    export_fill(seg, tmp)
                    step += 1
                if seg.verify is not None:
                    if self._verify_wanted(tmp / seg.spec.file):
                        progress(f"exporting the verify graph of layers {seg.spec.start}-{seg.spec.stop}", step, total)
                        export_verify(seg, tmp)
                    else:
                        verifies.pop(seg.spec.graph(VERIFY))
                        seg.spec, seg.verify = seg.spec.with_graph(VERIFY, None), None
                    step += 1
            graphs = [seg.spec.file for seg in plan.segments] + list(fills) + list(verifies) + [h.file for h in plan.heads]
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
                    given = opt.calibration_prompts
                    prompts = read_prompts(given, has_tok) if given else default_prompts(has_tok, src.config.vocab_size)
                    feeds = record_feeds(tmp, prompts[:8])
                for file in graphs:  # fill and verify graphs take their segment's inputs: the same feeds
                    apply_precision(tmp / file, self.precision, opt.block_size, self.target.backend,
                                    feeds.get(fills.get(file, verifies.get(file, file))))
                manifest = self._manifest(tmp, plan, self.precision)
            self._heads_inside(tmp, plan)
            step += 1
            progress("storing each weight once", step, total)
            store_once(tmp / GRAPHS, stored_order(plan))
            manifest = self._manifest(tmp, plan, self.precision)
            step += 1
            progress("writing manifest", step, total)
            write_manifest(tmp, manifest)
            traces = None
            if opt.calibrate and manifest.exits:
                manifest, traces = calibrate_dir(
                    tmp, opt.calibration_prompts, opt.calibration_tokens, metric or opt.calibration_metric,
                    progress=lambda what, done, n: progress(f"calibrating: {what}", step + 1, total))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Staged(tmp, manifest, traces)

    def _verify_wanted(self, segment: Path) -> bool:
        """Whether to write the last segment's verify graph, as ``speculative`` says (``segment``: its fp32 graph)."""
        size = sum(f.stat().st_size for f in segment.parent.glob(segment.name + "*"))
        return self.options.speculative == "on" or self.options.speculative == "auto" and size <= FUSE_LIMIT

    def _heads_inside(self, tmp: Path, plan) -> None:
        """Write the exit segments' graphs with their heads inside, as ``fuse_heads`` says; record
        them in the plan's specs."""
        for seg in plan.segments:
            spec = seg.spec
            if not (spec.exit and spec.exit.file and spec.emits_hidden and not spec.scores_exit):
                continue
            graph = tmp / spec.file
            size = sum(f.stat().st_size for f in graph.parent.glob(graph.name + "*"))  # the graph and its weights
            if self.options.fuse_heads == "off" or self.options.fuse_heads == "auto" and size > FUSE_LIMIT:
                continue
            file = spec.file.removesuffix(".onnx") + "_with_head.onnx"
            write_with_head(tmp / spec.file, tmp / spec.exit.file, tmp / file)
            seg.spec = spec.with_graph(WITH_HEAD, file)

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
            catch_up=self.options.catch_up,
        )
