"""`eec` commands. Each command calls one library function; errors that are
the user's to fix print one line and exit with status 1."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from eec.errors import EecError, InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile early-exit models into per-segment ONNX artifacts and run them.")
err = Console(stderr=True, soft_wrap=True)  # messages whole on one line in logs; the terminal wraps them
out = Console()
# A log or a pipe: rich's 80 columns would cut the tables' figures to "0.9…" or wrap them cell by cell.
if not out.is_terminal and "COLUMNS" not in os.environ:
    out = Console(width=160)
if not err.is_terminal and "COLUMNS" not in os.environ:
    err = Console(stderr=True, soft_wrap=True, width=160)


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound as Ctrl-C is, so that a compile or calibration removes its staging folder."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _user_errors(fn):
    """One line on stderr and exit 1 for eec's own errors; exit 130 on Ctrl-C, 143 on SIGTERM."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except EecError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in COMPILE_EXTRA:
                raise
            hint, missing = escape("pip install 'eec[compile]'"), e.name.split(".")[0]
            err.print(f"[bold red]error:[/] this command needs eec's compile extra ({missing} is not installed): "
                      f"{hint}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)
            err.print("terminated" if terminated else "interrupted")
            raise typer.Exit(143 if terminated else 130) from None

    return wrapper


# Packages of the `eec[compile]` extra: a runtime-only install lacks them.
COMPILE_EXTRA = {"torch", "transformers", "accelerate", "gguf", "onnx", "onnxscript", "onnx_ir"}

DEVICE_HELP = ("where the graphs run: cpu, cuda (onnxruntime-gpu, fp16 artifacts), tensorrt (built engines), "
               "or auto (tensorrt where built, else cuda for fp16 where available, else cpu)")


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} must be numbers separated by commas, got {text!r}") from None


@contextlib.contextmanager
def _progress():
    """Yields ``update(what, done, total, extra="")``: a live bar on a terminal, else plain timed lines
    (a log of a long train or compile shows where it is)."""
    if not err.is_terminal:
        yield _plain_progress()
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<48}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("working", total=None)

        def update(what: str, done: int, total: int, extra: str = "") -> None:
            bar.update(task, description=f"{what} {extra}".strip(), completed=done, total=total)

        yield update


PLAIN_EVERY_S = 10.0  # a step that reports often (training batches) prints at most this often


def _plain_progress():
    start, last = time.monotonic(), {"what": None, "at": -PLAIN_EVERY_S}

    def update(what: str, done: int, total: int, extra: str = "") -> None:
        now = time.monotonic()
        if what == last["what"] and now - last["at"] < PLAIN_EVERY_S and done != total:
            return
        last.update(what=what, at=now)
        elapsed = int(now - start)
        counts = f" ({done}/{total})" if total else ""
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {what}{counts} {extra}".rstrip(), file=sys.stderr, flush=True)

    return update


def _torch_side() -> None:
    """Before the compiler or trainer loads a model: local files only, and one progress display (eec's)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader has a bar of its own
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", ",").split(",") if x.strip()]
    except ValueError:
        raise InputError(f"expected numbers separated by commas, got {text!r}") from None
    if not ids:
        raise InputError(f"expected numbers separated by commas, got {text!r}")
    return ids


@app.command("train")
@_user_errors
def train_cmd(
    base: Path = typer.Argument(..., help="base model: Hugging Face directory or .gguf file"),
    exits: str = typer.Option(..., help="exit layers to train heads for, e.g. 8,12,16,20,24"),
    output: Path = typer.Option(..., "-o", "--output", help="checkpoint to write (model.pt)"),
    prompts: Optional[Path] = typer.Option(None, help="starting prompts, one per line (default: eec's own set)"),
    lam: float = typer.Option(0.1, "--lambda", help="entropy weight λ in (1-λ)·CE − λ·H"),
    epochs: int = typer.Option(4, help="passes over the training tokens"),
    lr: float = typer.Option(1e-3, help="learning rate of the heads (AdamW)"),
    backbone_lr: float = typer.Option(2e-5, help="learning rate of the backbone in joint mode"),
    floor: float = typer.Option(0.95, help="joint mode: undo the epoch that takes the final layer's agreement with the original below this"),
    layer_drop: float = typer.Option(0.0, help="joint mode: skip probability of the deepest layer per batch, "
                                          "rising linearly from 0 at the first (LayerSkip)"),
    max_new_tokens: int = typer.Option(64, help="tokens the base model generates per prompt"),
    tokens: Optional[int] = typer.Option(None, help="use at most this many training tokens"),
    init: str = typer.Option("copy", help="copy (the final norm and LM head) or fresh"),
    mode: str = typer.Option("heads", help="heads (frozen backbone) or joint (fine-tune the backbone too)"),
    seed: int = typer.Option(0, help="random seed; the same seed gives the same heads"),
    recipe: Optional[str] = typer.Option(None, help="text classifiers: deebert, pabee, fastbert or berxit "
                                         "(default deebert)"),
    data: Optional[Path] = typer.Option(None, help="text classifiers: training texts, JSONL or CSV with text and "
                                        "label (fastbert: labels optional)"),
    heldout: Optional[Path] = typer.Option(None, help="text classifiers: held-out texts for the accuracy report "
                                           "(default: a tenth of --data)"),
    batch_size: int = typer.Option(16, help="text classifiers: texts a step"),
) -> None:
    """Train exit heads for BASE and write model.pt: self-supervised heads (Valade) for a decoder; for a
    text classifier (a Hugging Face *ForSequenceClassification directory), heads by a recipe on --data."""
    from eec.compiler.encoders import is_encoder_dir

    if is_encoder_dir(base):
        if prompts is not None:
            raise InputError("--prompts is for decoders; a text classifier trains on --data")
        return _train_classifier(base, exits, output, recipe or "deebert", data, heldout, epochs, backbone_lr, lr,
                                 batch_size, seed)
    if recipe is not None or data is not None or heldout is not None:
        raise InputError("--recipe, --data and --heldout are for text classifiers; "
                         f"{base} is not a *ForSequenceClassification directory")
    _torch_side()
    from eec.train import TrainConfig, train
    from eec.calib.calibrate import read_prompt_lines

    config = TrainConfig(exits=_parse_ids(exits), lam=lam, epochs=epochs, lr=lr, backbone_lr=backbone_lr, floor=floor,
                         layer_drop=layer_drop, max_new_tokens=max_new_tokens,
                         max_tokens=tokens, init=init, mode=mode, seed=seed,
                         prompts=read_prompt_lines(prompts) if prompts else [])
    with _progress() as update:

        def progress(what: str, done: int, total: int, figures: dict) -> None:
            update(what, done, total, " ".join(f"{k} {v:.3f}" for k, v in figures.items()))
            if "agreement" in figures:
                err.print(f"{what}: agreement with the final model {figures['agreement']:.3f}")

        result = train(base, output, config, progress)
    table = Table("exit layer", "agreement before", "after", "last loss")
    for r in result.heads:
        table.add_row(str(r.layer), f"{r.agreement_before:.3f}", f"{r.agreement:.3f}", f"{r.loss:.3f}")
    err.print("held-out agreement with the original model's token:")
    err.print(table)
    if result.final_agreement is not None:
        err.print(f"fine-tuned final layer agrees with the original on {result.final_agreement:.3f} of held-out tokens "
                  f"after {result.epochs_run} of {epochs} epochs (floor {floor})")
        if result.undone_final_agreement is not None:
            err.print(f"epoch {result.epochs_run + 1} took it to {result.undone_final_agreement:.3f}, below the floor: "
                      "undone, training stopped there")
    err.print(f"wrote {output}; compile it with `eec compile {output}`")


def _train_classifier(base: Path, exits: str, output: Path, recipe: str, data: Optional[Path], heldout: Optional[Path],
                      epochs: int, backbone_lr: float, lr: float, batch_size: int, seed: int) -> None:
    _torch_side()
    from eec.train.encoder import ClassifierTrainConfig, heldout_table, train_classifier

    if data is None:
        raise InputError("training a text classifier's exits needs texts: --data train.jsonl (text, label)")
    config = ClassifierTrainConfig(recipe=recipe, exits=_parse_ids(exits), epochs=epochs, lr=backbone_lr,
                                   head_lr=lr, batch_size=batch_size, seed=seed)
    with _progress() as update:
        result = train_classifier(base, data, output, config, heldout,
                                  lambda what, done, total, figures: update(
                                      what, done, total, " ".join(f"{k} {v:.3f}" for k, v in figures.items())))
    if result.accuracy_after:
        table = Table("layer", "held-out accuracy before (the model's own classifier)", "after")
        for layer, before, after in heldout_table(result):
            table.add_row(str(layer), "-" if before is None else f"{before:.3f}", "-" if after is None else f"{after:.3f}")
        err.print(f"{recipe}: held-out accuracy on {result.heldout} texts, per exit and the final classifier:")
        err.print(table)
    err.print(f"wrote {output}; compile it with `eec compile {output}`")


@app.command("compile")
@_user_errors
def compile_cmd(
    model: Path = typer.Argument(..., help="Hugging Face model directory, .gguf file or eec model.pt"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="artifact directory to write (default: beside "
                                          "MODEL, named after it and the target, e.g. model-jetson-orin.eec)"),
    exits: Optional[str] = typer.Option(None, help="exit layers, e.g. 8,16,24; 'auto' to choose among the heads by predicted "
                                        "latency; 'none' (default: the checkpoint's heads, else quarter depths)"),
    eps: Optional[float] = typer.Option(None, help="accuracy level the --exits auto placement optimises for "
                                        "(default 0.9; classifiers 0.99)"),
    candidates: Optional[str] = typer.Option(None, help="layers --exits auto chooses among, e.g. 2,4,6, or 'all' "
                                             "(default: the checkpoint's heads, else quarter depths)"),
    batch: int = typer.Option(1, help="--exits auto: price the exits for this many sequences decoded at once "
                              "(a server's --max-batch; an exit most rows pass now and then saves nothing there)"),
    target: str = typer.Option("cpu", help="device target (`eec targets list`)"),
    profile: Optional[Path] = typer.Option(None, help="latency profile from `eec targets measure` (default: the target's model)"),
    shortlist: str = typer.Option("0", help="restrict exit heads to the K most emitted tokens; 0: whole vocabulary; "
                                            "'auto': chosen with --exits auto"),
    exit_classifier: bool = typer.Option(False, "--exit-classifier", help="train a small classifier per exit that "
                                         "decides before the head runs (thresholds then apply to its score)"),
    precision: Optional[str] = typer.Option(None, help="fp32, fp16, int8 (weight-only), int8-dynamic, int4, or int4-gguf (int4 keeping a Q4_1 GGUF's own blocks) (default: the target's)"),
    block_size: int = typer.Option(32, help="int4/int8 weight-only block size (weights per scale)"),
    overwrite: bool = typer.Option(False, help="replace an existing artifact"),
    calibrate: bool = typer.Option(True, help="trace the compiled artifact on calibration prompts (for --eps)"),
    prompts: Optional[Path] = typer.Option(None, help="calibration prompts, one per line (default: eec's own set)"),
    calibration_tokens: int = typer.Option(48, help="tokens generated per calibration prompt"),
    metric: Optional[str] = typer.Option(None, help="confidence metric (default: the one that exits most at ε = 0.9)"),
    catch_up: str = typer.Option("exact", help="how deeper layers get exited tokens' keys and values: exact (run them) "
                                 "or propagate (project the exit's hidden state, as CALM; cheaper, not exact)"),
    fuse_heads: str = typer.Option("auto", help="also write exit segments with their head inside, run in one call "
                                   "when exiting: on, off, or auto (segments up to 64 MB, where it pays)"),
    speculative: str = typer.Option("auto", help="also write the last segment's verify graph for --mode speculative "
                                    "(lossless): on, off, or auto (where there are exits and it is up to 64 MB)"),
    data: Optional[Path] = typer.Option(None, help="classifier networks: held-out inputs as an .npz with x (and "
                                        "optionally labels y), for thresholds, static int8 and --exits auto"),
    criterion: Optional[str] = typer.Option(None, help="classifiers: what ε holds exits to, agreement with full "
                                            "mode or accuracy against --data's labels (default: accuracy where "
                                            "--data has labels); placement's and the artifact's default"),
    rule: Optional[str] = typer.Option(None, help="classifiers: threshold rule, joint (the default: one threshold, "
                                       "ε over all samples), risk (each exit's takers) or valade; placement's and "
                                       "the artifact's default"),
) -> None:
    """Compile MODEL into per-segment ONNX graphs with exit heads, then calibrate them.

    MODEL is a decoder (Hugging Face directory, .gguf, or model.pt from `eec train`) or a branched
    classifier network written by eec.compiler.save_early_exit."""
    from eec.compiler.branched import is_branched_file
    from eec.compiler.encoders import is_encoder_checkpoint, is_encoder_dir

    if is_branched_file(model) or is_encoder_dir(model) or is_encoder_checkpoint(model):
        decoder_only = {"--shortlist": shortlist != "0", "--exit-classifier": exit_classifier, "--prompts": prompts,
                        "--candidates": candidates, "--catch-up": catch_up != "exact", "--profile": profile,
                        "--batch": batch != 1}
        given = [name for name, set_ in decoder_only.items() if set_]
        if given:
            raise InputError(f"{', '.join(given)} applies to decoders; {model} is a classifier network")
        from eec.calib.classifier_calibration import DEFAULT_CRITERION, DEFAULT_RULE

        _compile_classifier(model, output or default_output(model, target), exits, target, precision, data,
                            metric, 0.99 if eps is None else eps, overwrite, criterion or DEFAULT_CRITERION,
                            rule or DEFAULT_RULE)
        return
    if data is not None:
        raise InputError("--data is for classifier networks; decoders calibrate on --prompts")
    if criterion is not None or rule is not None:
        raise InputError("--criterion and --rule are for classifier networks; a decoder's rule is chosen when it "
                         "runs (eec generate --rule)")
    eps = 0.9 if eps is None else eps
    _torch_side()
    from eec.compiler import CompileOptions, compile_model

    options = CompileOptions(exits=_parse_exits(exits), target=target, precision=precision, block_size=block_size,
                             calibrate=calibrate, calibration_prompts=prompts, calibration_tokens=calibration_tokens,
                             calibration_metric=metric, placement_eps=eps, placement_batch=batch, profile=profile,
                             shortlist=_parse_shortlist(shortlist), exit_classifier=exit_classifier,
                             candidates=_parse_candidates(candidates), catch_up=catch_up, fuse_heads=fuse_heads,
                             speculative=speculative)
    output = output or default_output(model, target)
    with _progress() as update:
        manifest = compile_model(model, output, options, overwrite=overwrite, progress=update)
    for line in (manifest.placement or {}).get("report", []):
        err.print(line)
    if manifest.target != target:
        err.print(f"target {target}: every member of the family runs these graphs; recorded as {manifest.target}, "
                  "whose latency figures `eec profile` and placement use")
    cal = manifest.calibration
    err.print(f"wrote {output}: {len(manifest.segments)} segments, exits at {manifest.exits or 'none'}, "
              f"{manifest.precision}, target {manifest.target}, catch-up {manifest.catch_up}, "
              + (f"calibrated on {cal.tokens} tokens (metric {cal.metric})" if cal else "not calibrated"))


def _compile_classifier(model: Path, output: Path, exits: str | None, target: str, precision: str | None,
                        data: Path | None, metric: str | None, eps: float, overwrite: bool, criterion: str,
                        rule: str) -> None:
    """A branched network file (`save_early_exit`), or a Hugging Face sequence classifier directory or the
    checkpoint `eec train` wrote for one."""
    from eec.compiler.branched import is_branched_file

    stages = _parse_exits(exits)
    with _progress() as update:
        if not is_branched_file(model):
            _torch_side()
            from eec.compiler.encoder_pipeline import compile_encoder

            manifest = compile_encoder(model, output, exits=stages, target=target, precision=precision, data=data,
                                       metric=metric, placement_eps=eps, overwrite=overwrite, criterion=criterion,
                                       rule=rule, progress=update)
        else:
            from eec.compiler.branched_pipeline import compile_branched

            manifest = compile_branched(model, output, exits=stages, target=target, precision=precision, data=data,
                                        metric=metric, placement_eps=eps, overwrite=overwrite, criterion=criterion,
                                        rule=rule, progress=update)
    for line in (manifest.placement or {}).get("report", []):
        err.print(line)
    cal = manifest.calibration
    if cal is not None and manifest.exits:
        _classifier_report(output)
    err.print(f"wrote {output}: {len(manifest.segments)} segments, exits after stages {manifest.exits or 'none'}, "
              f"{manifest.precision}, target {manifest.target}, "
              + (f"calibrated on {cal.samples} {'labeled ' if cal.labeled else ''}samples (metric {cal.metric})"
                 if cal else "not calibrated (pass --data calib.npz for --eps)"))


def default_output(model: Path, target: str) -> Path:
    """``model.pt`` -> ``model.eec`` beside it on the CPU target, ``model-<target>.eec`` on others."""
    model = Path(model)
    stem = model.name if model.is_dir() else model.stem
    return model.absolute().parent / (f"{stem}.eec" if target == "cpu" else f"{stem}-{target}.eec")


def _parse_exits(text: str | None) -> list[int] | str | None:
    """Layer numbers, 'auto', or 'none' (the full model alone, one segment)."""
    if text is None:
        return None
    text = text.strip()
    if text in ("auto", "none"):
        return "auto" if text == "auto" else []
    if not text.replace(",", "").strip():
        raise InputError(f"--exits needs layer numbers (e.g. 8,16,24), 'auto' or 'none'; got {text!r}")
    return _parse_ids(text)


def _parse_candidates(text: str | None) -> list[int] | str | None:
    if text is None:
        return None
    return "all" if text.strip() == "all" else _parse_ids(text)


def _parse_shortlist(text: str) -> int | str:
    text = text.strip()
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise InputError(f"--shortlist must be a number of tokens or 'auto', got {text!r}") from None


@app.command("calibrate")
@_user_errors
def calibrate_cmd(
    artifact: Path = typer.Argument(..., help="compiled artifact directory"),
    prompts: Optional[Path] = typer.Option(None, help="calibration prompts, one per line (default: eec's own set)"),
    max_new_tokens: int = typer.Option(48, help="tokens generated per prompt"),
    metric: Optional[str] = typer.Option(None, help="confidence metric (default: the one that exits most at ε = 0.9)"),
    data: Optional[Path] = typer.Option(None, help="classifier artifacts: held-out inputs as an .npz with x (and "
                                        "optionally labels y); text classifiers: JSONL or CSV with text (and label)"),
    criterion: Optional[str] = typer.Option(None, help="classifier artifacts: what ε holds exits to from now on, "
                                            "agreement or accuracy (default: the artifact's own)"),
    rule: Optional[str] = typer.Option(None, help="classifier artifacts: the threshold rule from now on, joint, risk "
                                       "or valade (default: the artifact's own)"),
) -> None:
    """Trace ARTIFACT on calibration prompts (a classifier: on --data) and store the traces, so that --eps works."""
    if _is_classifier(artifact):
        if prompts is not None or max_new_tokens != 48:
            raise InputError(f"{artifact} is a classifier: it calibrates on --data (held-out inputs), not prompts")
        if data is None:
            raise InputError("calibrating a classifier needs held-out inputs: --data calib.npz (x, optional labels y)")
        from eec.calib.classifier_calibration import calibrate_classifier, read_inputs
        from eec.runtime.classifier_manifest import read_classifier_manifest

        x, y = read_inputs(data, read_classifier_manifest(artifact))
        with _progress() as update:
            calibrate_classifier(artifact, x, y, metric, progress=update, criterion=criterion, rule=rule)
        return _classifier_report(artifact)
    if data is not None:
        raise InputError("--data is for classifier artifacts; decoders calibrate on --prompts")
    if criterion is not None or rule is not None:
        raise InputError("--criterion and --rule are for classifier artifacts; a decoder's rule is chosen when it "
                         "runs (eec generate --rule)")
    from eec.calib.calibrate import calibrate
    from eec.runtime.manifest import read_manifest

    with _progress() as update:
        calibrate(artifact, prompts, max_new_tokens, metric, progress=update)
    _calibration_report(artifact, read_manifest(artifact), err)


@app.command()
@_user_errors
def generate(
    artifact: Path = typer.Argument(..., help="compiled artifact directory"),
    prompt: Optional[str] = typer.Argument(None, help="prompt text (or token ids with --ids)"),
    prompts: Optional[Path] = typer.Option(None, help="a file of prompts, one a line (comma-separated token ids "
                                           "for an artifact without a tokenizer), decoded together in batches"),
    max_batch: int = typer.Option(8, help="with --prompts: sequences decoded at once"),
    stop: Optional[list[str]] = typer.Option(None, help="stop at this text (repeat for several)"),
    temperature: Optional[float] = typer.Option(None, help="sample at this temperature (default: greedy)"),
    top_k: Optional[int] = typer.Option(None, help="sample from the k most likely tokens (at most 64)"),
    top_p: Optional[float] = typer.Option(None, help="sample from the fewest most likely tokens holding this mass"),
    seed: Optional[int] = typer.Option(None, help="seed for sampling: the same seed, the same tokens"),
    mode: str = typer.Option("early-exit", help="early-exit, full, or speculative (full mode's tokens: the exit "
                             "drafts while confident at --eps, the deeper layers verify)"),
    eps: Optional[float] = typer.Option(None, "--eps", help="accuracy level ε in [0, 1]: share of exited tokens that agree with the full model (calibrated artifacts; default 0.9, 0.95 for speculative drafts)"),
    threshold: Optional[str] = typer.Option(None, help="fixed exit thresholds instead of --eps: one number, or one per exit (e.g. 0.8,0.9,0.95)"),
    metric: Optional[str] = typer.Option(None, help="confidence metric (default: the calibrated one)"),
    rule: str = typer.Option("risk", help="threshold rule for --eps: risk (holds with probability 1-δ) or valade"),
    delta: float = typer.Option(0.1, help="δ of the risk rule"),
    max_new_tokens: int = typer.Option(128, help="tokens to generate at most"),
    ids: bool = typer.Option(False, "--ids", help="PROMPT is comma-separated token ids"),
    chat: bool = typer.Option(True, help="wrap the prompt in the model's chat template"),
    threads: Optional[int] = typer.Option(None, help="onnxruntime threads (default: all cores)"),
    catch_up: Optional[str] = typer.Option(None, help="exact or propagate (default: the artifact's)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    max_draft: Optional[int] = typer.Option(None, help="speculative mode: tokens drafted at most before a verify (default 6)"),
    draft_layer: Optional[int] = typer.Option(None, help="speculative mode: the exit that drafts (default: the first)"),
    monitor: bool = typer.Option(False, "--monitor", help="early-exit mode: check exited tokens against the final "
                                 "head as they catch up, and report how many it agrees with (needs the verify graph)"),
    split: Optional[int] = typer.Option(None, help="run the layers up to the exit at this layer here, the rest on "
                                        "--server (eec serve ARTIFACT --split N)"),
    server: Optional[str] = typer.Option(None, help="with --split: the eec server's URL, e.g. http://host:8000"),
    timeout: float = typer.Option(2.0, help="with --split: seconds to wait for the server before this device's "
                                  "last exit decides the token"),
) -> None:
    """Generate from ARTIFACT with early exits, streaming the text; or from every line of --prompts at once."""
    from eec.runtime import GenerationOptions, load

    thresholds = None
    if threshold is not None:
        values = _parse_floats(threshold, "--threshold")
        thresholds = values[0] if len(values) == 1 else values
    if (prompt is None) == (prompts is None):
        raise InputError("give one PROMPT or --prompts FILE")
    if _is_classifier(artifact):
        raise InputError(f"{artifact} is a classifier artifact: run it with load(...).classify(x) or profile it with "
                         "`eec profile --data`")
    model = load(artifact, threads=threads, catch_up=catch_up, device=device, split=split, server=server,
                 timeout=timeout)
    options = GenerationOptions(max_new_tokens=max_new_tokens, mode=mode, thresholds=thresholds, epsilon=eps,
                                rule=rule, delta=delta, chat=chat, stop=stop or None, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed)
    how = dict(metric=metric, max_draft=max_draft, draft_layer=draft_layer, monitor=monitor)
    if prompts is not None:
        from eec.calib.calibrate import read_prompts

        start = time.perf_counter()
        results = model.generate(read_prompts(prompts, model.codec is not None), options, max_batch=max_batch, **how)
        elapsed = time.perf_counter() - start
        for i, r in enumerate(results):
            sys.stdout.write(f"[{i}] {r.text if r.text is not None else ' '.join(map(str, r.tokens))}\n")
        tokens = sum(r.stats.new_tokens for r in results)
        full = sum(r.stats.context_full for r in results)
        err.print(f"{len(results)} prompts, {tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tok/s with "
                  f"prefill, up to {max_batch} at once)"
                  + (f"; {full} stopped at the model's context ({model.manifest.model.context_length} positions)"
                     if full else ""), highlight=False)
        return
    pieces = model.generate(_parse_ids(prompt) if ids else prompt, options, stream=True, **how)
    for piece in pieces:
        sys.stdout.write(piece if isinstance(piece, str) else f"{piece} ")
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    from eec.targets.profiling import decode_gb_per_s

    stats = model.stats
    gb_s = None if model.split is not None else decode_gb_per_s(model, stats, mode, metric, draft_layer)
    err.print(str(stats) + ("" if gb_s is None else f"; weights read at {gb_s:.2f} GB/s")
              + (f"; stopped at the model's context ({model.manifest.model.context_length} positions)"
                 if stats.context_full else ""), highlight=False, soft_wrap=True)


@app.command()
@_user_errors
def serve(
    artifact: Path = typer.Argument(..., help="compiled artifact directory (a text generator or a classifier)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, help="port to listen on"),
    name: Optional[str] = typer.Option(None, help="the model's name in the API (default: the folder's name)"),
    max_batch: int = typer.Option(8, help="sequences decoded at once"),
    max_queue: int = typer.Option(256, help="requests that may wait for a row; past it new ones get 429"),
    eps: Optional[float] = typer.Option(None, "--eps", help="accuracy level of requests that give no epsilon "
                                        "(default: 0.9 for text generators, 0.95 for classifiers)"),
    threads: Optional[int] = typer.Option(None, help="onnxruntime threads (default: all cores)"),
    monitor: Optional[bool] = typer.Option(None, "--monitor/--no-monitor", help="check exited tokens against the "
                                           "final head live, reported in /metrics (default: where the artifact "
                                           "has the verify graph)"),
    max_samples: int = typer.Option(1, help="classifiers: requests waiting while one runs are classified "
                                    "together, up to this many samples a call (1: one request a call; more pays "
                                    "where the model gains from batches, as on a GPU)"),
    split: Optional[int] = typer.Option(None, help="also serve /v1/tail: the layers after the exit at this layer "
                                        "(a classifier's: stage), for devices that run the rest (load(..., split=N, "
                                        "server=URL), eec generate --split --server)"),
    sessions: int = typer.Option(64, help="with --split: devices' sequences whose KV the server keeps (the least "
                                 "recently used leaves; its device sends it again)"),
    replicas: Optional[str] = typer.Option(None, help="run N replicas (or auto: Ray's autoscaler, 1 to 8) on Ray "
                                           "Serve behind its router; needs pip install 'eec\\[ray]'"),
    ray_address: Optional[str] = typer.Option(None, help="with --replicas: the Ray cluster to join (auto: the one "
                                              "`ray start` runs here; default: a new one on this machine)"),
    replica_cpus: float = typer.Option(1.0, help="with --replicas: Ray CPUs each replica holds"),
) -> None:
    """Serve ARTIFACT over HTTP: OpenAI's /v1/completions and /v1/chat/completions (or /v1/classify), /health,
    /metrics. Needs the serve extra: pip install 'eec\\[serve]'."""
    from eec.serve import missing_extra

    problem = missing_extra()
    if problem:
        raise InputError(problem)
    if not 0 < port < 65536:
        raise InputError(f"--port must be in 1..65535, got {port}")
    if max_queue < 0:
        raise InputError(f"--max-queue must be at least 0, got {max_queue}")
    options = dict(name=name, max_batch=max_batch, max_queue=max_queue, threads=threads, epsilon=eps, monitor=monitor,
                   max_samples=max_samples)
    if split is not None:
        if replicas is not None:
            raise InputError("--split keeps each device's KV in one server: it does not run with --replicas")
        if sessions < 1:
            raise InputError(f"--sessions must be at least 1, got {sessions}")
        options.update(split=split, sessions=sessions)
    if replicas is not None:
        _serve_on_ray(artifact, host, port, replicas, ray_address, replica_cpus, options)
        return
    if ray_address is not None:
        raise InputError("--ray-address goes with --replicas")
    import socket

    import uvicorn

    from eec.serve.app import create_app

    try:  # bound before the model loads: a taken port is a one-line error, not a log line after the load
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    application = create_app(artifact, **options)
    service = application.state.service
    err.print(f"serving {service.name} ({service.kind}) on http://{host}:{port}  (Ctrl-C stops)", highlight=False)
    server = uvicorn.Server(uvicorn.Config(application, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def _serve_on_ray(artifact: Path, host: str, port: int, replicas: str, address: Optional[str], cpus: float,
                  options: dict) -> None:
    """`eec serve --replicas`: the same application as a Ray Serve deployment (`eec.serve.ray_app`)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InputError("--replicas runs on Ray Serve, which is not installed: pip install 'eec[ray]'") from None
    from eec.serve.ray_app import deployment

    count: int | str = int(replicas) if replicas.isdigit() else replicas  # "auto", or refused by `deployment`
    if cpus <= 0:
        raise InputError(f"--replica-cpus must be more than 0, got {cpus}")
    app_ = deployment(artifact, replicas=count, cpus=cpus, **options)  # checked before Ray starts
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    # Ray's core installs a SIGTERM handler that dies on the spot, leaving its agents behind: ours unwinds
    # to the shutdowns below.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        serve.start(http_options={"host": host, "port": port})
        err.print(f"serving {artifact.name} on http://{host}:{port} with {replicas} replicas on Ray Serve "
                  "(Ctrl-C stops)", highlight=False)
        serve.run(app_, name="eec", route_prefix="/", blocking=True)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


@app.command("split")
@_user_errors
def split_cmd(
    artifact: Path = typer.Argument(..., help="compiled artifact directory (a text generator)"),
    at: int = typer.Option(..., "--at", help="the exit's layer where the device's part ends"),
    device_out: Optional[Path] = typer.Option(None, "--device", help="the device part (default: ARTIFACT-device.eec)"),
    server_out: Optional[Path] = typer.Option(None, "--server", help="the server part (default: ARTIFACT-server.eec)"),
    overwrite: bool = typer.Option(False, help="replace existing parts"),
) -> None:
    """Cut ARTIFACT at an exit into a device part and a server part, each holding only its own weights:
    `eec serve SERVER-PART` on the server, `eec generate DEVICE-PART --server URL` on the device."""
    from eec.compiler.split import split_artifact

    if _is_classifier(artifact):
        raise InputError(f"{artifact} is a classifier artifact: only text generators split for now")
    stem = artifact.name.removesuffix(".eec")
    device_out = device_out or artifact.with_name(f"{stem}-device.eec")
    server_out = server_out or artifact.with_name(f"{stem}-server.eec")
    device, server = split_artifact(artifact, at, device_out, server_out, overwrite)
    for path, part in ((device_out, device), (server_out, server)):
        size = sum((path / f).stat().st_size for f in part.files) / 1e6
        layers = f"{part.first_layer}-{part.last_layer}"
        err.print(f"wrote {path}: {part.part.role} part, layers {layers}, {size:.1f} MB", highlight=False)


@app.command()
@_user_errors
def inspect(artifact: Path = typer.Argument(..., help="compiled artifact directory")) -> None:
    """Show an artifact's model, segments, exits, sizes and precision."""
    from eec.runtime.manifest import read_manifest

    if _is_classifier(artifact):
        return _inspect_classifier(artifact)
    m = read_manifest(artifact)
    spec = m.model
    out.print(f"[bold]{artifact}[/]  {spec.architecture} ({spec.family}) from {spec.source}")
    out.print(f"layers {spec.num_layers}, hidden {spec.hidden_size}, heads {spec.num_heads}/{spec.num_kv_heads} kv, "
              f"vocab {spec.vocab_size}, context {spec.context_length}")
    out.print(f"precision {m.precision}, target {m.target}, tokenizer {'yes' if m.tokenizer else 'no (token ids)'}, "
              f"chat template {'yes' if m.tokenizer and m.tokenizer.chat_template else 'no'}")
    if m.part is not None:
        n, at = spec.num_layers, m.part.at
        out.print(f"the {m.part.role} part of a split at layer {at}: "
                  + (f"layers 0-{at} here, {at}-{n} on the server (`eec generate {artifact} --server URL`)"
                     if m.part.role == "device" else
                     f"layers {at}-{n} here, behind `eec serve`, for a device that runs layers 0-{at}")
                  + f"; the whole model's exits: {', '.join(map(str, m.part.exits))}", highlight=False)

    def megabytes(file: str) -> str:  # the graph and its external weights
        return f"{sum((artifact / f).stat().st_size for f in m.files if f.startswith(file)) / 1e6:.1f}"

    table = Table("graph", "layers", "head at its end", "size (MB)")
    for s in m.segments:
        head = f"{s.exit.kind}, layer {s.exit.layer}" + ("" if s.exit.file else " (inside the segment)")
        table.add_row(s.file, f"{s.start}-{s.stop}", head, megabytes(s.file))
    for file in dict.fromkeys(s.exit.file for s in m.segments if s.exit.file):  # in layer order
        users = [str(s.exit.layer) for s in m.segments if s.exit.file == file]
        table.add_row(file, "-", f"exit head for layer {', '.join(users)}", megabytes(file))
    for s in m.segments:
        roles = {"fill": "key/value fill (propagating catch-up)", "with_head": f"layer {s.exit.layer}'s head inside "
                 "(early exit)", "verify": "the token at every position (speculative verify)"}
        for role, what in roles.items():
            if s.graph(role):
                table.add_row(s.graph(role), f"{s.start}-{s.stop}", what, megabytes(s.graph(role)))
    out.print(table)
    out.print(f"exits: {', '.join(map(str, m.exits)) or 'none'}; catch-up: {m.catch_up}")
    if m.exits and m.calibration is None and m.part is None:  # a split's device part holds the calibration
        out.print(f"not calibrated: `eec calibrate {artifact}` for --eps (fixed --threshold values work without)")
    elif m.calibration is not None:
        _calibration_report(artifact, m, out)
    for line in (m.placement or {}).get("report", []):
        out.print(line, highlight=False, soft_wrap=True)


INSPECT_EPS = (0.8, 0.9, 0.95, 0.99)


def _calibration_report(artifact: Path, m, console: Console) -> None:
    """What each ε does on a decoder's own calibration traces (``m``: its manifest, read and checked):
    τ per exit, where tokens leave, how many layers they run, agreement with the final head."""
    from eec.calib.traces import Traces, simulate, thresholds_for

    cal, n = m.calibration, m.model.num_layers
    traces = Traces.load(artifact / cal.file)  # read_manifest has checked its sha256
    console.print(f"calibrated on {cal.prompts} prompts, {cal.tokens} tokens, metric {cal.metric}; on those tokens "
                  "(risk rule, δ = 0.1):", highlight=False)
    table = Table("ε", *[f"τ at {k}" for k in traces.exits], "tokens leaving at " + ", ".join(map(str, traces.exits)),
                  "mean layers", "agreement")
    for eps in INSPECT_EPS:
        taus = thresholds_for(traces, eps, cal.metric)
        sim = simulate(traces, taus, cal.metric, n)
        leaving = ", ".join(f"{sim.exits.get(k, 0) / max(len(traces), 1):.0%}" for k in traces.exits)
        table.add_row(f"{eps}", *[f"{taus[k]:.3f}" for k in traces.exits], leaving, f"{sim.mean_depth:.1f} of {n}",
                      f"{sim.agreement:.3f}")
    console.print(table)


def _is_classifier(artifact: Path) -> bool:
    from eec.runtime.classifier_manifest import SCHEMA
    from eec.runtime.manifest import artifact_schema

    return artifact_schema(artifact) == SCHEMA


def _inspect_classifier(artifact: Path) -> None:
    from eec.runtime.classifier_manifest import read_classifier_manifest

    m = read_classifier_manifest(artifact)
    if m.text:  # stage 0 is the embeddings, stage k layer k
        what = (f"{m.architecture} text classifier from {escape(m.source)}: texts of up to {m.text.max_length} tokens, "
                f"{m.num_classes} classes, {m.num_stages - 1} layers")
        unit = "layers"
    else:
        shape = escape(f"[batch, {', '.join(map(str, m.input_shape))}]")
        what = (f"classifier from {escape(m.source or 'a branched network')}: input {shape} {m.input_dtype}, "
                f"{m.num_classes} classes, {m.num_stages} stages")
        unit = "stages"
    out.print(f"[bold]{escape(str(artifact))}[/]  {what}")
    out.print(f"precision {m.precision}, target {m.target}")
    table = Table("graph", unit, "ends in", "size (MB)")
    for k, s in enumerate(m.segments):
        last = k == len(m.segments) - 1
        for role, file in s.graphs.items():
            ends = ("the final classifier" if last else f"exit after {unit[:-1]} {s.exit}"
                    if role.startswith("with_head") else "the hidden state (full mode)")
            ends += ", no padding" if role.endswith("_unpadded") else ""
            span = f"{max(s.start, 1)}-{s.stop - 1}" + (" (after the embeddings)" if s.start == 0 else "") \
                if m.text else f"{s.start}-{s.stop - 1}"
            table.add_row(file, span, ends, f"{(artifact / file).stat().st_size / 1e6:.2f}")
    out.print(table)
    cal = m.calibration
    out.print(f"exits after {unit}: {', '.join(map(str, m.exits)) or 'none'}; "
              + (f"calibrated on {cal.samples} {'labeled ' if cal.labeled else ''}samples, metric {cal.metric}"
                 if cal else "not calibrated"))
    for line in (m.placement or {}).get("report", []):
        out.print(line, highlight=False, soft_wrap=True)


def _classifier_report(artifact: Path) -> None:
    """The calibration report of a classifier artifact: what early exit does on the calibration set at each ε."""
    from eec.calib.classifier_calibration import report
    from eec.runtime import load

    model = load(artifact)
    cal = model.manifest.calibration
    table = Table("ε", *(["of"] if cal.labeled else []), *[f"τ after stage {k}" for k in model.exits], "exit early",
                  "mean stages", "agreement", *(["accuracy"] if cal.labeled else []))
    for criterion in ("agreement", "accuracy") if cal.labeled else ("agreement",):
        for r in report(model, criterion=criterion):
            accuracy = [f"{r['accuracy']:.4f} (final {r['final_accuracy']:.4f})"] if cal.labeled else []
            table.add_row(f"{r['epsilon']}", *([criterion] if cal.labeled else []),
                          *[f"{t:.3f}" for t in r["thresholds"]], f"{r['exit_rate']:.2f}",
                          f"{r['mean_stages']:.2f} of {model.num_stages}", f"{r['agreement']:.4f}", *accuracy)
    err.print(f"calibrated on {cal.samples} {'labeled ' if cal.labeled else ''}samples, metric {cal.metric}; on "
              f"the calibration set itself ({cal.rule} rule, δ = 0.1)"
              + (", ε of agreement with full mode or of accuracy (criterion='accuracy'):" if cal.labeled else ":"))
    err.print(table)


def _print_batch_rows(rows) -> None:
    """Aggregate tokens/s per batch size, full mode and each ε, with the speedup at that batch."""
    batches = list(dict.fromkeys(r.batch for r in rows))
    levels = list(dict.fromkeys(r.epsilon for r in rows))
    by = {(r.batch, r.epsilon): r for r in rows}
    table = Table("ε", *[f"tok/s at {b}" for b in batches], *[f"speedup at {b}" for b in batches])
    for e in levels:
        table.add_row("full" if e is None else f"{e}", *[f"{by[(b, e)].tokens_per_s:.1f}" for b in batches],
                      *[f"{by[(b, e)].speedup:.2f}x" for b in batches])
    out.print("sequences decoded together (the prompts in turn, every row's new tokens over the wall time, "
              "prefill included):", highlight=False)
    out.print(table)


def _profile_classifier(artifact: Path, eps: str, data: Optional[Path], batch: str, rounds: int,
                        metric: Optional[str], criterion: Optional[str], json_out: Optional[Path], plot: Optional[Path],
                        threads: Optional[int], device: str) -> None:
    from eec.runtime import load
    from eec.targets.classifier_profiling import profile_classifier
    from eec.targets.measure import busy_warning

    levels = _parse_floats(eps, "--eps")
    if not levels or any(not 0 < e < 1 for e in levels):
        raise InputError(f"--eps must be numbers between 0 and 1, got {eps!r}")
    batches = _parse_ids(batch)
    if any(b < 1 for b in batches) or rounds < 1:
        raise InputError("--batch sizes and --rounds must be at least 1")
    if data is None:
        raise InputError("profiling a classifier needs inputs: --data test.npz (x, and labels y for accuracy)")
    for path in (json_out, plot):
        if path is not None and not path.parent.exists():
            raise InputError(f"output folder {path.parent} does not exist")
    if plot is not None:
        _require_matplotlib()
    model = load(artifact, threads=threads, device=device)
    if model.exits and model.manifest.calibration is None:
        raise InputError(f"{artifact} is not calibrated; compile it with --data calib.npz")
    from eec.calib.classifier_calibration import read_inputs

    x, y = read_inputs(data, model.manifest)
    if warning := busy_warning():
        err.print(f"warning: {warning}")
    with _progress() as update:
        rows = profile_classifier(model, x, y, levels, batches, rounds, metric, progress=update, criterion=criterion)
    table = Table("ε", *[f"samples/s at {b}" for b in batches], *[f"speedup at {b}" for b in batches], "ideal",
                  "agreement", "accuracy", "exits (stage: samples)")
    for r in rows:
        table.add_row("full" if r.epsilon is None else f"{r.epsilon}", *[f"{r.samples_per_s[b]:.0f}" for b in batches],
                      *[f"{r.speedups[b]:.2f}x" for b in batches], f"{r.ideal_speedup:.2f}x", f"{r.agreement:.4f}",
                      "-" if r.accuracy is None else f"{r.accuracy:.4f}",
                      " ".join(f"{k}:{v}" for k, v in r.exits.items()))
    out.print(table)
    if json_out is not None:
        import json

        _write_atomic(json_out, json.dumps([r.to_dict() for r in rows], indent=2))
    if plot is not None:
        _plot_profile(rows, plot, artifact.name)


@app.command()
@_user_errors
def profile(
    artifact: Path = typer.Argument(..., help="calibrated artifact directory"),
    eps: str = typer.Option("0.8,0.9,0.95,0.99", help="accuracy levels to profile, comma-separated"),
    prompts: Optional[Path] = typer.Option(None, help="prompts, one per line (default: eec's calibration set, first 4)"),
    tokens: int = typer.Option(128, help="new tokens per prompt"),
    rounds: Optional[int] = typer.Option(None, help="interleaved rounds over the prompts, or the inputs (medians are reported; default 2, classifiers 5)"),
    metric: Optional[str] = typer.Option(None, help="confidence metric (default: the artifact's)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the rows as JSON here"),
    plot: Optional[Path] = typer.Option(None, help="also draw speedup and agreement against ε into this PNG"),
    threads: Optional[int] = typer.Option(None, help="onnxruntime threads (default: all cores)"),
    catch_up: Optional[str] = typer.Option(None, help="exact or propagate (default: the artifact's)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    speculative: Optional[bool] = typer.Option(None, "--speculative/--no-speculative", help="also time speculative "
                                               "mode (lossless; default: where the artifact has its verify graph)"),
    draft_layer: Optional[int] = typer.Option(None, help="speculative mode: the exit that drafts (default: the first)"),
    data: Optional[Path] = typer.Option(None, help="classifier artifacts: inputs as an .npz with x (and labels y "
                                        "for accuracy); text classifiers: JSONL or CSV with text (and label)"),
    batch: Optional[str] = typer.Option(None, help="batch sizes to time, comma-separated: a decoder's prompts "
                                        "decoded that many at once (default: one at a time only); a classifier's "
                                        "inputs (default 1,64)"),
    criterion: Optional[str] = typer.Option(None, help="classifier artifacts: what ε holds exits to, agreement "
                                            "with full mode (default) or accuracy (needs a labeled calibration)"),
) -> None:
    """Measure tokens/s (samples/s for a classifier), speedup over full mode, agreement, exits and bandwidth at
    each ε on this device."""
    if _is_classifier(artifact):
        decoder_only = {"--prompts": prompts, "--catch-up": catch_up, "--speculative": speculative,
                        "--draft-layer": draft_layer is not None}
        given = [name for name, set_ in decoder_only.items() if set_]
        if given:
            raise InputError(f"{', '.join(given)} applies to decoder artifacts; {artifact} is a classifier")
        return _profile_classifier(artifact, eps, data, batch or "1,64", 5 if rounds is None else rounds, metric,
                                   criterion, json_out, plot, threads, device)
    if data is not None:
        raise InputError("--data is for classifier artifacts; decoders are profiled on --prompts")
    if criterion is not None:
        raise InputError("--criterion is for classifier artifacts; a decoder's ε is agreement with its full mode")
    rounds = 2 if rounds is None else rounds
    from eec.calib.calibrate import default_prompts, read_prompts
    from eec.runtime import load
    from eec.runtime.model import SPECULATIVE_EPSILON
    from eec.targets.measure import busy_warning
    from eec.targets.profiling import profile_artifact, profile_batches

    levels = _parse_floats(eps, "--eps")
    if not levels or any(not 0 < e < 1 for e in levels):
        raise InputError(f"--eps must be numbers between 0 and 1, got {eps!r}")
    if tokens < 2 or rounds < 1:
        raise InputError("--tokens must be at least 2 and --rounds at least 1")
    batches = _parse_ids(batch) if batch is not None else []
    if any(b < 1 for b in batches):
        raise InputError(f"--batch must be whole numbers of at least 1, got {batch!r}")
    for path in (json_out, plot):
        if path is not None and not path.parent.exists():
            raise InputError(f"output folder {path.parent} does not exist")
    if plot is not None:
        _require_matplotlib()
    model = load(artifact, threads=threads, catch_up=catch_up, device=device)
    if model.exits and model.manifest.calibration is None:
        raise InputError(f"{artifact} is not calibrated; run `eec calibrate {artifact}` first")
    if not model.exits:  # every ε runs the full model (`--exits auto` writes one where no exit pays)
        err.print(f"{artifact} has no exits: it is the full model at every ε, profiled in full mode alone")
        levels = []
    can_verify = any(s.graph("verify") for s in model.manifest.segments) and model.catch_up == "exact"
    if speculative and not can_verify:
        raise InputError(f"{artifact} cannot run speculative mode: it needs the verify graph (compile with "
                         "--speculative on) and the exact catch-up")
    draft_eps = SPECULATIVE_EPSILON if (can_verify if speculative is None else speculative) else None
    if draft_layer is not None and (draft_eps is None or draft_layer not in model.exits):
        raise InputError(f"--draft-layer {draft_layer}: speculative mode drafts at one of this artifact's exits "
                         f"({', '.join(map(str, model.exits)) or 'none'}), and only where it runs")
    has_tok = model.codec is not None
    the_prompts = (read_prompts(prompts, has_tok) if prompts
                   else default_prompts(has_tok, model.manifest.model.vocab_size)[:4])
    if warning := busy_warning():
        err.print(f"warning: {warning}")
    with _progress() as update:
        rows = profile_artifact(model, the_prompts, levels, tokens, rounds, metric, draft_eps, draft_layer,
                                progress=update)
        batch_rows = profile_batches(model, the_prompts, levels, batches, tokens, rounds, metric,
                                     progress=update) if batches else []
    table = Table("ε", "tok/s", "speedup", "ideal", "real/ideal", "agreement", "GB/s",
                  "ideal ms/token: segments + heads + catch-up", "exits per layer")
    for r in rows:
        c = r.cost_ms
        if r.mode == "speculative":  # lossless: its quality is equality with full mode; the verify in catch-up's place
            kept = "-" if r.drafts_kept is None else f"{r.drafts_kept:.0%}"
            table.add_row(f"speculative (drafts at {r.epsilon})", f"{r.tokens_per_s:.1f}", f"{r.speedup:.2f}x",
                          f"{r.ideal_speedup:.2f}x", f"{r.realised_over_ideal:.2f}", f"{r.agreement:.3f}",
                          f"{r.gb_per_s:.1f}", f"{c['segments']:.3f} + {c['heads']:.3f} + {c['catch_up']:.3f} (verify)",
                          f"drafts kept: {kept}, {r.tokens_per_verify:.1f} tokens a verify")
            continue
        table.add_row("full" if r.epsilon is None else f"{r.epsilon}", f"{r.tokens_per_s:.1f}", f"{r.speedup:.2f}x",
                      f"{r.ideal_speedup:.2f}x", f"{r.realised_over_ideal:.2f}", f"{r.agreement:.3f}",
                      f"{r.gb_per_s:.1f}", f"{c['segments']:.3f} + {c['heads']:.3f} + {c['catch_up']:.3f}",
                      " ".join(f"{k}:{v}" for k, v in r.exits.items()))
    out.print(table)
    if batch_rows:
        _print_batch_rows(batch_rows)
    from eec.targets.profiling import verdict

    for line in verdict(rows):
        out.print(line, highlight=False, soft_wrap=True)
    if json_out is not None:
        import json

        _write_atomic(json_out, json.dumps([r.to_dict() for r in [*rows, *batch_rows]], indent=2))
    if plot is not None:
        _plot_profile(rows, plot, artifact.name)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'eec[plot]'") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _plot_profile(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r for r in rows if r.mode == "early-exit"]
    eps = [r.epsilon for r in levels]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(eps, [r.speedup for r in levels], "o-", label="measured speedup")
    ax.plot(eps, [r.ideal_speedup for r in levels], "s--", label="ideal speedup")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("accuracy level ε")
    ax.set_ylabel("speedup over full mode")
    twin = ax.twinx()
    twin.plot(eps, [r.agreement for r in levels], "^-", color="tab:green", label="agreement")
    twin.set_ylabel("teacher-forced agreement")
    handles = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="center left", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


@app.command("build-engines")
@_user_errors
def build_engines_cmd(artifact: Path = typer.Argument(..., help="artifact compiled for a TensorRT target")) -> None:
    """Build ARTIFACT's TensorRT engines on this device (engines belong to one GPU and TensorRT version)."""
    from eec.targets.engines import build_engines

    with _progress() as update:
        manifest = build_engines(artifact, progress=update)
    err.print(f"built TensorRT engines for {artifact} into {artifact / manifest.engines['dir']}")


targets_app = typer.Typer(no_args_is_help=True, help="Device targets: their figures and measured latency profiles.")
app.add_typer(targets_app, name="targets")


@targets_app.command("list")
@_user_errors
def targets_list() -> None:
    """List the known targets with their backend, precisions and memory bandwidth."""
    from eec.targets.profiles import TARGETS

    table = Table("target", "backend", "precisions", "GB/s", "fp16 TFLOPS")
    for t in TARGETS.values():
        precisions = [f"{t.default_precision}*"] + [p for p in t.precisions if p != t.default_precision]
        table.add_row(t.name, t.backend, ",".join(precisions), f"{t.bandwidth_gbs:g}", f"{t.fp16_tflops:g}")
    out.print(table)
    out.print("* default precision; `eec targets show NAME` for the description and sources")


@targets_app.command("show")
@_user_errors
def targets_show(name: str = typer.Argument(..., help="target name, e.g. jetson-orin-agx")) -> None:
    """Show one target's figures and where they come from."""
    from eec.targets.profiles import get_target

    for key, value in get_target(name).to_dict().items():
        out.print(f"{key:18} {', '.join(value) if isinstance(value, tuple) else value}")


@targets_app.command("measure")
@_user_errors
def targets_measure(
    artifacts: list[Path] = typer.Argument(..., help="compiled artifacts of one model to time on this device (e.g. "
                                           "one cut at every candidate exit and one without exits)"),
    output: Path = typer.Option(..., "-o", "--output", help="latency profile to write (JSON)"),
    past: int = typer.Option(128, help="cached positions before the timed calls"),
    repeats: int = typer.Option(20, help="timed passes over the whole chain per token count (the median is kept)"),
    batch: int = typer.Option(1, help="also time each segment's decode step over this many sequences, for "
                              "`eec compile --exits auto --batch` (default: one sequence only)"),
) -> None:
    """Time every segment of the ARTIFACTS at 1..8 tokens per call and every exit head, on this device."""
    from eec.targets.latency import segment_chains
    from eec.targets.measure import busy_warning, measure_artifacts

    if not output.parent.exists():
        raise InputError(f"output folder {output.parent} does not exist")
    if warning := busy_warning():
        err.print(f"warning: {warning}")
    with _progress() as update:
        table = measure_artifacts(artifacts, past=past, repeats=repeats, progress=update, batch=batch)
    _write_atomic(output, table.to_json())
    rows = Table("layers", *[f"{s} tok (ms)" for s in (1, 2, 4, 8)])
    for (a, b), times in table.segments.items():
        rows.add_row(f"{a}-{b}", *[f"{times[s - 1] * 1e3:.2f}" for s in (1, 2, 4, 8)])
    out.print(rows)
    for (a, b), by_rows in table.rows.items():
        for n, t in by_rows.items():
            out.print(f"layers {a}-{b} over {n} sequences, one token each: {t * 1e3:.2f} ms")
    for layer, t in table.heads.items():
        out.print(f"exit head at layer {layer}: {t * 1e3:.2f} ms")
    for (a, b), t in table.with_head.items():
        out.print(f"layers {a}-{b} with the exit head inside: {t * 1e3:.2f} ms (1 token)")
    for n, (step_s, call_s, exit_s) in table.host.items():
        out.print(f"eec's own work in a decode step of {n} sequence(s), outside the graphs: {step_s * 1e6:.0f} µs a step, "
                  f"{call_s * 1e6:.0f} µs a segment call, {exit_s * 1e6:.0f} µs an exit decision")
    if table.segment_overhead:
        fitted = f"; fixed cost per segment call {table.segment_overhead * 1e6:.0f} µs"
    elif segment_chains(table.segments):  # measured, and too small to show above the noise
        fitted = "; no fixed cost per segment call measurable (a range's call cost no less than its parts)"
    else:
        fitted = "; measure an artifact without exits too to fit the fixed cost per segment call"
    out.print(f"per-call overhead {table.call_overhead * 1e6:.0f} µs{fitted}; wrote {output}")


if __name__ == "__main__":
    app()
