"""Writing an artifact: one writer per output, staged beside it, left-overs of killed writers removed.

A compile or calibration builds its result in a hidden staging folder next to
the output and renames it into place at the end (`eec.runtime.manifest.replace_dir`),
so a failure changes nothing. Rules:

1. A writer holds an exclusive lock on ``.<name>.lock`` beside the output
   ``<name>`` for its whole run (`output_lock`); a second writer to the same
   output is refused at once with the holder's process id, so two runs cannot
   both say they wrote it. The lock is the operating system's (``flock``):
   a killed process never leaves a held lock behind.
2. Staging folders are named after the output (``.<name>.build-*``,
   ``.<name>.calib-*``, ``.<name>.old-*``, `new_stage`). Under the lock no
   other process can be writing them, so every such folder left there is a
   killed writer's and is removed (`output_lock` does it on entry).
3. SIGTERM is turned into the same unwinding as Ctrl-C by the CLI
   (`eec.cli.main`), which removes the staging folder; a process killed
   outright (SIGKILL, power loss) leaves it for rule 2.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from eec.errors import InputError

KINDS = ("build", "calib", "old")


def _lock_file(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold ``out``'s writer lock (rule 1) and clear killed writers' staging folders (rule 2)."""
    import fcntl

    out = Path(out).absolute()
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    path = _lock_file(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"cannot write beside {out}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"another eec process (pid {holder}) is writing {out}; wait for it or choose "
                             "another output") from None
        # The file may have been removed by the previous holder between our open and lock: lock the one on disk.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        for kind in KINDS:
            for stale in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def new_stage(out: Path, kind: str) -> Path:
    """A fresh staging folder for ``out`` (rule 2's names); the caller holds `output_lock`."""
    assert kind in KINDS
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-", dir=out.parent))


def check_output(out: Path, overwrite: bool) -> None:
    """``out`` may be written: absent, or an artifact to replace with ``overwrite``; its folder exists."""
    from eec.runtime.manifest import MANIFEST

    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not (out / MANIFEST).is_file():
        raise InputError(f"{out} exists and is not an eec artifact; refusing to replace it")
    if not out.parent.exists():
        raise InputError(f"output folder {out.parent} does not exist")


@contextlib.contextmanager
def restaged(root: Path, replaced: tuple[str, ...] = ()) -> Iterator[Path]:
    """A staged copy of the artifact ``root`` to change (hard links: no copy of the weights), swapped in whole
    when the block ends, removed if it raises. ``replaced``: files the block rewrites, unlinked first so that
    nothing is written through a link into the original."""
    from eec.runtime.manifest import replace_dir

    with output_lock(root):
        stage = new_stage(root, "calib")
        try:
            shutil.rmtree(stage)
            shutil.copytree(root, stage, copy_function=os.link)
            for name in replaced:
                (stage / name).unlink(missing_ok=True)
            yield stage
            replace_dir(stage, root)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
