"""`eec` commands. Each command calls one library function; errors that are
the user's to fix print one line and exit with status 1."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from eec.errors import EecError, InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile early-exit models into per-segment ONNX artifacts and run them.")
err = Console(stderr=True)
out = Console()


def _user_errors(fn):
    """One line on stderr and exit 1 for eec's own errors; exit 130 on Ctrl-C."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EecError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} must be numbers separated by commas, got {text!r}") from None


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", ",").split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--ids expects token ids separated by commas, got {text!r}") from None


@app.command("compile")
@_user_errors
def compile_cmd(
    model: Path = typer.Argument(..., help="Hugging Face model directory, .gguf file or eec model.pt"),
    output: Path = typer.Option(..., "-o", "--output", help="artifact directory to write (e.g. smollm2.eec)"),
    exits: Optional[str] = typer.Option(None, help="exit layers, e.g. 8,16,24 (default: the checkpoint's heads, else quarter depths)"),
    target: str = typer.Option("cpu", help="device target"),
    precision: Optional[str] = typer.Option(None, help="weight precision (default: the target's)"),
    overwrite: bool = typer.Option(False, help="replace an existing artifact"),
) -> None:
    """Compile MODEL into per-segment ONNX graphs with exit heads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader has a bar of its own
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers.utils import logging as hf_logging

    from eec.compiler import compile_model

    hf_logging.disable_progress_bar()  # eec shows one progress display of its own
    hf_logging.set_verbosity_error()

    layers = None
    if exits is not None:
        try:
            layers = [int(x) for x in exits.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--exits must be layer numbers separated by commas, got {exits!r}") from None
    with Progress(TextColumn("{task.description:<48}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("compiling", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        manifest = compile_model(model, output, exits=layers, target=target, precision=precision,
                                 overwrite=overwrite, progress=progress)
    err.print(f"wrote {output}: {len(manifest.segments)} segments, exits at {manifest.exits or 'none'}, "
              f"{manifest.precision}, target {manifest.target}")


@app.command()
@_user_errors
def generate(
    artifact: Path = typer.Argument(..., help="compiled artifact directory"),
    prompt: str = typer.Argument(..., help="prompt text (or token ids with --ids)"),
    mode: str = typer.Option("early-exit", help="early-exit or full"),
    threshold: Optional[str] = typer.Option(None, help="exit confidence threshold: one number, or one per exit (e.g. 0.8,0.9,0.95)"),
    max_new_tokens: int = typer.Option(128, help="tokens to generate at most"),
    ids: bool = typer.Option(False, "--ids", help="PROMPT is comma-separated token ids"),
    chat: bool = typer.Option(True, help="wrap the prompt in the model's chat template"),
    threads: Optional[int] = typer.Option(None, help="onnxruntime threads (default: all cores)"),
) -> None:
    """Generate from ARTIFACT with early exits, streaming the text."""
    from eec.runtime import load

    thresholds = None
    if threshold is not None:
        values = _parse_floats(threshold, "--threshold")
        thresholds = values[0] if len(values) == 1 else values
    the_prompt = _parse_ids(prompt) if ids else prompt
    model = load(artifact, threads=threads)
    pieces = model.generate(the_prompt, max_new_tokens=max_new_tokens, mode=mode, thresholds=thresholds,
                            stream=True, chat=chat)
    for piece in pieces:
        sys.stdout.write(piece if isinstance(piece, str) else f"{piece} ")
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    err.print(str(model.stats), highlight=False, soft_wrap=True)


@app.command()
@_user_errors
def inspect(artifact: Path = typer.Argument(..., help="compiled artifact directory")) -> None:
    """Show an artifact's model, segments, exits, sizes and precision."""
    from eec.runtime.manifest import read_manifest

    m = read_manifest(artifact)
    spec = m.model
    out.print(f"[bold]{artifact}[/]  {spec.architecture} ({spec.family}) from {spec.source}")
    out.print(f"layers {spec.num_layers}, hidden {spec.hidden_size}, heads {spec.num_heads}/{spec.num_kv_heads} kv, "
              f"vocab {spec.vocab_size}, context {spec.context_length}")
    out.print(f"precision {m.precision}, target {m.target}, tokenizer {'yes' if m.tokenizer else 'no (token ids)'}, "
              f"chat template {'yes' if m.tokenizer and m.tokenizer.chat_template else 'no'}")
    def megabytes(file: str) -> str:  # the graph and its external weights
        return f"{sum((artifact / f).stat().st_size for f in m.files if f.startswith(file)) / 1e6:.1f}"

    table = Table("graph", "layers", "head at its end", "size (MB)")
    for s in m.segments:
        head = f"{s.exit.kind}, layer {s.exit.layer}" + ("" if s.exit.file else " (fused)")
        table.add_row(s.file, f"{s.start}-{s.stop}", head, megabytes(s.file))
    for file in sorted({s.exit.file for s in m.segments if s.exit.file}):
        users = [str(s.exit.layer) for s in m.segments if s.exit.file == file]
        table.add_row(file, "-", f"exit head for layer {', '.join(users)}", megabytes(file))
    out.print(table)
    out.print(f"exits: {', '.join(map(str, m.exits)) or 'none'}")


if __name__ == "__main__":
    app()
