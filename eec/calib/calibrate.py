"""``eec calibrate``: trace the compiled artifact on calibration prompts and store the traces.

The traces come from the artifact's own graphs, so whatever precision it was
compiled to is what gets calibrated. Each prompt is decoded greedily through
every layer while every exit head runs, so each token gives, per exit, the
scores and whether the exit agreed with the final head at the same prefix.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from eec.calib.traces import Traces, choose_metric, metric_index
from eec.errors import InputError
from eec.runtime.staging import restaged
from eec.runtime.manifest import CalibrationSpec, Manifest, read_manifest, sha256_file, write_manifest

CALIBRATION_FILE = "calibration.npz"
Progress = Callable[[str, int, int], None]  # (what is happening, steps done, steps in all)


def no_progress(_what: str, _done: int, _total: int) -> None:
    pass


def prompt_lines(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def packaged_prompts(package: str) -> list[str]:
    return prompt_lines(resources.files(package).joinpath("prompts.txt").read_text(encoding="utf-8"))


def default_prompts(has_tokenizer: bool, vocab_size: int) -> list[str] | list[list[int]]:
    """The packaged prompt set; for an artifact without a tokenizer, fixed random token ids."""
    if has_tokenizer:
        return packaged_prompts("eec.calib")
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, size=8).tolist() for _ in range(32)]


def read_prompt_lines(path: Path) -> list[str]:
    """A prompts file (`prompt_lines`); an unreadable or empty one is an error."""
    try:
        lines = prompt_lines(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read prompts file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"prompts file {path} is not UTF-8 text (byte {e.start})") from None
    if not lines:
        raise InputError(f"prompts file {path} has no prompts (one per line)")
    return lines


def read_prompts(path: Path, has_tokenizer: bool) -> list[str] | list[list[int]]:
    """Prompts for an artifact: token ids separated by commas when it has no tokenizer."""
    lines = read_prompt_lines(path)
    if has_tokenizer:
        return lines
    try:
        return [[int(x) for x in line.split(",")] for line in lines]
    except ValueError:
        raise InputError(f"{path}: this artifact has no tokenizer, so each line must be comma-separated token ids") from None


def collect_traces(model, prompts: Sequence, max_new_tokens: int, progress: Progress = no_progress) -> Traces:
    """Decode each prompt through every layer with every exit head running."""
    exits = model.exits
    if not exits:
        raise InputError("this artifact has no exits to calibrate")
    all_heads = {e: math.inf for e in exits}
    eos = set(model.manifest.eos_token_ids)
    scores, agreed, sequence, hidden, final = [], [], [], [], []
    for i, prompt in enumerate(prompts):
        progress(f"tracing prompt {i + 1}/{len(prompts)}", i, len(prompts))
        ids = model.encode(prompt)
        decoder = model.new_decoder()
        room = model.manifest.model.context_length - len(ids)
        result = decoder.step(np.asarray([ids], dtype=np.int64), None)  # prefill: no exit decision
        for _ in range(min(max_new_tokens, room) - 1):
            if result.token in eos:
                break
            result = decoder.step(np.asarray([[result.token]], dtype=np.int64), all_heads, trace=True)
            scores.append([result.scores[e] for e in exits])
            agreed.append([result.exit_tokens[e] == result.token for e in exits])
            hidden.append(np.stack([result.hidden[e] for e in exits]).astype(np.float16))
            final.append(result.token)
            sequence.append(i)
    progress("traced", len(prompts), len(prompts))
    if not scores:
        raise InputError("calibration produced no tokens (every prompt ended at once); use longer or other prompts")
    return Traces(exits, np.asarray(scores, dtype=np.float32), np.asarray(agreed, dtype=bool), np.asarray(sequence),
                  np.asarray(hidden, dtype=np.float16), np.asarray(final, dtype=np.int64))


def write_calibration(root: Path, manifest: Manifest, traces: Traces, metric: str, prompts: int) -> Manifest:
    """Store traces in the artifact directory ``root`` (being built, or a staged copy) whose manifest is
    ``manifest``; returns the manifest written with them."""
    traces.save(root / CALIBRATION_FILE)
    spec = CalibrationSpec(CALIBRATION_FILE, metric, len(traces), prompts)
    files = {**manifest.files, CALIBRATION_FILE: sha256_file(root / CALIBRATION_FILE)}
    manifest = replace(manifest, files=files, calibration=spec)
    write_manifest(root, manifest)
    return manifest


def calibrate_dir(root: Path, prompts_file: Path | None = None, max_new_tokens: int = 48,
                  metric: str | None = None, progress: Progress = no_progress) -> tuple[Manifest, Traces]:
    """Trace and store, in place: for an artifact directory nobody else uses yet. Returns the manifest
    written and the traces, so that a caller building on them reads neither back."""
    from eec.runtime import load

    if metric is not None:
        metric_index(metric)
    model = load(root, verify=False)
    has_tok = model.codec is not None
    prompts = read_prompts(prompts_file, has_tok) if prompts_file else default_prompts(has_tok, model.manifest.model.vocab_size)
    traces = collect_traces(model, prompts, max_new_tokens, progress)
    chosen = metric or choose_metric(traces, model.num_layers)
    return write_calibration(root, model.manifest, traces, chosen, len(prompts)), traces


def calibrate(artifact: str | os.PathLike, prompts_file: Path | None = None, max_new_tokens: int = 48,
              metric: str | None = None, progress: Progress = no_progress) -> CalibrationSpec:
    """Calibrate an existing artifact. The new artifact is staged beside it (hard
    links, no copy of the weights) and swapped in whole, so a failure changes nothing."""
    root = Path(artifact).absolute()
    read_manifest(root)  # refuse a tampered artifact before building on it
    if max_new_tokens < 2:
        raise InputError("--max-new-tokens must be at least 2 for calibration")
    with restaged(root, replaced=(CALIBRATION_FILE,)) as stage:
        manifest, _ = calibrate_dir(stage, prompts_file, max_new_tokens, metric, progress)
    return manifest.calibration
