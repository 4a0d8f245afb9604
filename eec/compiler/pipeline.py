"""``compile_model``: source model -> artifact directory, all or nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from eec import __version__
from eec.compiler.export import export_head, export_segment
from eec.compiler.frontends import SourceModel, load_source
from eec.compiler.segments import check_repeats, default_exits, plan_segments
from eec.errors import InputError
from eec.calib.calibrate import Progress, calibrate_dir, no_progress, read_prompts
from eec.calib.traces import metric_index
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
from eec.targets.profiles import check_precision, get_target



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
    exits: list[int] | None = None,
    target: str = "cpu",
    precision: str | None = None,
    overwrite: bool = False,
    calibrate: bool = True,
    calibration_prompts: Path | None = None,
    calibration_tokens: int = 48,
    calibration_metric: str | None = None,
    progress: Progress = no_progress,
) -> Manifest:
    """Compile ``model`` into the artifact directory ``out`` and return its manifest.

    The artifact is built in a temporary directory beside ``out`` and renamed
    into place at the end, so a failure leaves nothing behind. With
    ``calibrate`` (and at least one exit) the built artifact is traced on the
    calibration prompts before it is moved into place (`eec.calib.calibrate`).
    """
    out = Path(out).absolute()
    tgt = get_target(target)
    precision = check_precision(tgt, precision)
    _check_output(out, overwrite)
    if exits is not None:
        check_repeats(exits)  # the range needs the model; repeats can be refused before loading it
    if calibrate and calibration_prompts is not None:
        read_prompts(calibration_prompts, has_tokenizer=True)  # unreadable or empty: refuse before the long work
    if calibrate and calibration_metric is not None:
        metric_index(calibration_metric)

    progress("loading model", 0, 1)
    src = load_source(model)
    plan = plan_segments(src, exits if exits is not None else default_exits(src))
    total = len(plan.segments) + len(plan.heads) + 2 + int(calibrate)
    step = 1

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for seg in plan.segments:
            progress(f"exporting layers {seg.spec.start}-{seg.spec.stop}", step, total)
            export_segment(seg, tmp)
            step += 1
        for head in plan.heads:
            progress(f"exporting {head.file}", step, total)
            export_head(head, tmp)
            step += 1
        progress("writing manifest", step, total)
        tokenizer = None
        if src.tokenizer is not None:
            (tmp / "tokenizer.json").write_text(src.tokenizer.json, encoding="utf-8")
            t = src.tokenizer
            tokenizer = TokenizerSpec("tokenizer.json", t.chat_template, t.bos_token, t.eos_token)
        manifest = Manifest(
            model=model_spec(src),
            segments=[p.spec for p in plan.segments],
            precision=precision,
            target=tgt.name,
            eos_token_ids=src.eos_token_ids,
            tokenizer=tokenizer,
            files=hash_files(tmp),
            eec_version=__version__,
        )
        write_manifest(tmp, manifest)
        if calibrate and manifest.exits:
            calibrate_dir(tmp, calibration_prompts, calibration_tokens, calibration_metric,
                          progress=lambda what, done, n: progress(f"calibrating: {what}", step + 1, total))
            manifest = read_manifest(tmp, verify=False)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress("done", total, total)
    return manifest
