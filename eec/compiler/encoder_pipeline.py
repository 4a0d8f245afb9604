"""``compile_encoder``: a BERT-family sequence classifier -> a text classifier artifact, all or nothing.

Stages are the embeddings (stage 0) and the layers (stage k is layer k), so
``exits=[2, 4]`` puts exits after 2 and 4 layers and a sample that leaves
there reports stage 2 or 4, as the decoders' layers count. Each segment is a
graph over (token ids or hidden state, padding mask) with a dynamic batch and
sequence length, exported by `eec.compiler.encoders` and checked against
PyTorch on another shape; exit segments get a second graph with the head
inside, as for every classifier artifact (`eec.runtime.classifier_manifest`).
Calibration (``data``: JSONL or CSV texts, labels optional) stores every
exit's probabilities for every text, as for branched networks.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from eec import __version__
from eec.calib.classifier_calibration import (DEFAULT_CRITERION, DEFAULT_RULE, check_auto_candidates, check_meaning,
                                             no_progress, read_texts, resolve_criterion, trace_batches,
                                             write_calibration)
from eec.compiler.encoders import EncoderSegment, SharedHead, SourceEncoder, load_encoder, load_encoder_checkpoint
from eec.compiler.weights import store_weights_once
from eec.errors import CompileError, InputError
from eec.runtime.classifier_manifest import (
    EXIT_SCORE,
    HIDDEN,
    HIDDEN_IN,
    IDS,
    LABEL,
    MASK,
    PROBS,
    UNPADDED,
    ClassifierManifest,
    ClassifierSegment,
    TextSpec,
    check_fields,
)
from eec.runtime.manifest import MANIFEST, PLAIN, WITH_HEAD, hash_files, replace_dir
from eec.runtime.staging import check_output, new_stage, output_lock
from eec.targets.profiles import get_target

TOKENIZER = "tokenizer.json"
PRECISIONS = ("fp32",)
CHECK_RTOL = 1e-4
OPSET = 20


def default_exits(num_layers: int) -> list[int]:
    """Quarter depths, as for decoders."""
    return sorted({max(1, round(num_layers * q)) for q in (0.25, 0.5, 0.75)} - {num_layers})


def compile_encoder(source: str | os.PathLike, out: str | os.PathLike, *, exits: list[int] | str | None = None,
                    target: str = "cpu", precision: str | None = None, data: str | os.PathLike | None = None,
                    metric: str | None = None, placement_eps: float = 0.99, overwrite: bool = False,
                    criterion: str = DEFAULT_CRITERION, rule: str = DEFAULT_RULE, progress=no_progress) -> ClassifierManifest:
    """Compile the Hugging Face sequence classifier directory ``source`` (or the checkpoint `eec train` wrote
    for one, with its trained exit heads) into the artifact ``out``.

    ``exits``: layer counts after which to exit (default the checkpoint's heads, else quarter depths; ``[]``
    none; ``"auto"``: of the checkpoint's heads, else every layer, the set with the lowest measured
    latency at ``placement_eps``, which needs ``data``); an exit without a trained head reuses the
    model's own classifier; ``data``: held-out texts (JSONL or CSV, a ``text`` column and optionally
    ``label``) to calibrate on; ``criterion`` and ``rule``: what ε means, for placement and by default at run
    time (`EarlyExitClassifier.classify`); by default accuracy where ``data`` has labels, else agreement, under
    one threshold for every exit (`DEFAULT_CRITERION`, `DEFAULT_RULE`)."""
    out = Path(out).absolute()
    tgt = get_target(target)
    if tgt.backend != "onnxruntime-cpu":
        raise InputError(f"text classifiers compile for the cpu target for now, not {tgt.name!r}")
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not available for a text classifier yet; choose from "
                         f"{', '.join(PRECISIONS)}")
    auto = exits == "auto"
    if auto and data is None:
        raise InputError("--exits auto needs held-out texts to calibrate on: pass --data calib.jsonl")
    if not 0.0 <= placement_eps <= 1.0:
        raise InputError(f"--eps must be in [0, 1], got {placement_eps}")
    check_meaning(criterion, rule, data)
    if metric is not None:
        from eec.runtime.classifier import METRICS

        if metric not in METRICS:
            raise InputError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    check_output(out, overwrite)
    progress("loading model", 0, 1)
    src = load_encoder(source) if Path(source).is_dir() else load_encoder_checkpoint(source)
    layers = src.num_layers
    if auto:
        kept = sorted(src.heads) or list(range(1, layers))
        check_auto_candidates(kept)
    else:
        kept = (sorted(src.heads) or default_exits(layers)) if exits is None else sorted(set(exits))
    bad = [k for k in kept if not 1 <= k < layers]
    if bad:
        raise InputError(f"--exits {bad}: exits sit after 1..{layers - 1} layers (this model has {layers})")
    texts, labels = (None, None) if data is None else read_texts(Path(data), src.class_names, src.num_labels)
    criterion = resolve_criterion(criterion, labels, data)
    meaning = {"criterion": criterion, "rule": rule}
    with output_lock(out):
        check_output(out, overwrite)
        tmp = new_stage(out, "build")
        try:
            placement = None
            if auto:  # every candidate built and calibrated, timed here; then the chosen set built alone
                kept, placement = _place(src, kept, tmp, tgt.name, texts, labels, placement_eps, metric, progress,
                                         meaning)
                metric = metric or placement["metric"]
                shutil.rmtree(tmp)
                tmp = new_stage(out, "build")
            manifest = _build(src, kept, tmp, tgt.name, texts, labels, metric, progress, placement, meaning)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest


def _place(src: SourceEncoder, candidates: list[int], tmp: Path, target: str, texts, labels, eps: float,
           metric: str | None, progress, meaning: dict) -> tuple[list[int], dict]:
    """The exits (a subset of ``candidates``) with the lowest expected latency a text at ``eps``: every
    candidate built and calibrated in ``tmp``, each segment's call timed here at batch 1 on the calibration
    text of median length, with its head and without (`place_by_times` prices the subsets)."""
    from eec.calib.classifier_calibration import place_by_times
    from eec.runtime.classifier import load_classifier
    from eec.targets.classifier_profiling import measure

    # the default metric this throwaway build stores is never read: "max-prob" spares choosing one
    manifest = _build(src, candidates, tmp, target, texts, labels, metric or "max-prob", progress, None, meaning)
    model = load_classifier(tmp)
    progress("measuring segment latency", 0, 1)
    ids, _ = model.text.encode(texts)
    median = sorted(range(len(ids)), key=lambda i: len(ids[i]))[len(ids) // 2]
    (_, one, side), = model.text.batches([texts[median]], 1)[0]
    sessions, inputs = model.batch_one_graphs()  # a text alone runs the twins without the mask
    with_head = measure(sessions, one, inputs=inputs, side=side)
    sessions, inputs = model.batch_one_graphs(heads=False)
    plain = measure(sessions, one, heads=False, inputs=inputs, side=side)
    probs, _ = model.calibration()
    return place_by_times(probs, with_head, plain, candidates, eps, metric, model.learned_scores,
                          ("layers", "text", "every layer"), meaning["rule"],
                          labels if meaning["criterion"] == "accuracy" else None)


def _build(src: SourceEncoder, kept: list[int], tmp: Path, target: str, texts, labels, metric,
           progress, placement: dict | None = None, meaning: dict | None = None) -> ClassifierManifest:
    (tmp / "graphs").mkdir()
    (tmp / TOKENIZER).write_text(src.tokenizer_json, encoding="utf-8")
    cuts = [*kept, src.num_layers]
    segments, start = [], 0
    for k, stop_layer in enumerate(cuts):
        progress("exporting segments", k, len(cuts))
        last = k == len(cuts) - 1
        first_layer = max(start, 1) - 1
        inputs = [IDS if start == 0 else HIDDEN_IN, MASK]
        # role -> (module, outputs): each exported, then its twin for calls without padding
        modules = {}
        if not last:
            head = src.heads.get(stop_layer) or SharedHead(src)  # a trained head, else the model's own classifier
            modules[PLAIN] = EncoderSegment(src, first_layer, stop_layer, None), [HIDDEN]
            outputs = [HIDDEN, PROBS, LABEL] + ([EXIT_SCORE] if src.learned_exit is not None else [])
            modules[WITH_HEAD] = (EncoderSegment(src, first_layer, stop_layer, head, learned_exit=src.learned_exit),
                                  outputs)
        else:
            modules[PLAIN] = (EncoderSegment(src, first_layer, stop_layer, SharedHead(src), keep_hidden=False),
                              [PROBS, LABEL])
        graphs = {}
        for role, (module, outputs) in modules.items():
            name = f"graphs/seg{k}" + ("" if role == PLAIN else f"_{role}")
            graphs[role] = _export(module, inputs, outputs, tmp, f"{name}.onnx", start == 0, src)
            twin = _unpadded(module, inputs, outputs, tmp, graphs[role], f"{name}_unpadded.onnx", start == 0, src)
            if twin is not None:
                graphs[UNPADDED[role]] = twin
        segments.append(ClassifierSegment(graphs, start, stop_layer + 1, inputs))
        start = stop_layer + 1
    store_weights_once(tmp, segments)
    spec = TextSpec(TOKENIZER, src.max_length, src.pad_id)
    manifest = ClassifierManifest(
        input_shape=[src.max_length], input_dtype="int64", num_classes=src.num_labels, num_stages=src.num_layers + 1,
        segments=segments, precision="fp32", target=target, class_names=src.class_names, eec_version=__version__,
        source=Path(src.source).name, text=spec, architecture=src.family,
        learned_exit=src.learned_exit is not None and bool(kept), placement=placement,
    )
    if texts is not None:
        from eec.runtime.classifier import TextInput
        from eec.runtime.sessions import open_sessions

        batches, n, _ = TextInput(tmp, spec).batches(texts, 32)
        sessions = [open_sessions(tmp, [s.graphs.get(WITH_HEAD, s.graphs[PLAIN])])[0] for s in segments]
        traced = trace_batches(sessions, [s.inputs for s in segments], src.num_labels, batches, n, progress,
                               learned=manifest.learned_exit)
        probs, learned = traced if manifest.learned_exit else (traced, None)
        manifest = write_calibration(tmp, manifest, probs, labels, metric, learned, **(meaning or {}))
    manifest = replace(manifest, files=hash_files(tmp))
    check_fields(manifest)
    (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def example_inputs(src: SourceEncoder, first: bool, batch: int, seq: int, seed: int, padded: bool = True):
    """Token ids (or a hidden state) and a padding mask with every row a different length (``padded``), or
    every row full."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([max(1, seq - 2 * i) if padded else seq for i in range(batch)])
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(torch.int64)
    if first:
        low = min(5, src.config.vocab_size - 1)
        ids = torch.randint(low, src.config.vocab_size, (batch, seq), generator=g)
        return torch.where(mask.bool(), ids, torch.full_like(ids, src.pad_id)), mask
    hidden = src.hidden_size
    return torch.randn(batch, seq, hidden, generator=g), mask


def _export(module, inputs: list[str], outputs: list[str], root: Path, file: str, first: bool,
            src: SourceEncoder) -> str:
    """Export ``module`` with a dynamic batch and length, then check it against PyTorch on another shape."""
    import torch
    from torch.export import Dim

    from eec.compiler.export import _quiet, _registry_built_once
    from eec.compiler.ops import TRANSLATIONS

    module.eval()
    what = f"{file} ({', '.join(outputs)})"
    batch, seq = Dim("batch"), Dim("seq")
    try:
        with _quiet(), torch.no_grad(), _registry_built_once():
            program = torch.onnx.export(module, example_inputs(src, first, 2, 5, 0), input_names=inputs,
                                        output_names=outputs, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                                        opset_version=OPSET, dynamo=True, verbose=False,
                                        custom_translation_table=TRANSLATIONS)
            program.optimize()
            program.save(str(root / file))
    except Exception as e:
        raise CompileError(f"exporting {what} to ONNX failed: {type(e).__name__}: {str(e)[:300]}") from e
    _check(module, inputs, outputs, root, file, example_inputs(src, first, 3, 7, 1))
    return file


def _unpadded(module, inputs: list[str], outputs: list[str], root: Path, file: str, twin: str, first: bool,
              src: SourceEncoder) -> str | None:
    """``file``'s twin without the padding mask (`DropPaddingMask`), for calls whose texts are all one length,
    checked against PyTorch on such a batch; None where the graph's mask cannot be taken out."""
    import onnx_ir as ir

    from eec.compiler.passes import DropPaddingMask

    model = ir.external_data.load_to_model(ir.load(root / file))
    if not DropPaddingMask(MASK)(model).modified:
        return None
    ir.save(model, root / twin)
    _check(module, inputs[:1], outputs, root, twin, example_inputs(src, first, 2, 7, 2, padded=False))
    return twin


def _check(module, inputs: list[str], outputs: list[str], root: Path, file: str, check) -> None:
    """The graph ``file`` against ``module`` on ``check`` (inputs and padding mask; the graph may take fewer)."""
    import torch

    from eec.runtime.sessions import open_sessions

    what = f"{file} ({', '.join(outputs)})"
    with torch.no_grad():
        expected = module(*check)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = open_sessions(root, [file])[0].run(outputs, {n: a.numpy() for n, a in zip(inputs, check)})
    keep = check[1].bool().numpy()  # padded positions' hidden states are never read
    for name, g, e in zip(outputs, got, expected):
        if name == LABEL:
            continue  # near-ties may swap; the probabilities are compared instead
        e = e.numpy()
        g, e = (g[keep], e[keep]) if name == HIDDEN else (g, e)
        err = float(np.max(np.abs(g - e)) / (1.0 + np.max(np.abs(e))))
        if not err <= CHECK_RTOL:
            raise CompileError(f"the ONNX graph {what} disagrees with PyTorch on {name} (relative error {err:.2e})")
