"""`eec split`: an artifact cut at one of its exits into a device part and a server part.

The device part holds the segments up to the exit (and that exit's head), the
tokenizer and the calibration; the server part the segments after it and their
heads. Each part's graphs are copied with their weights and stored once again
(`eec.compiler.weights.store_once`), so a part holds only the weights its
graphs use: the device carries no server layer. Each part's manifest names its
role, the layer and the whole artifact's fingerprint, which both sides send and
check on the wire (`eec.runtime.split`); each is staged beside its output and
renamed into place, so a failure leaves no part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import onnx_ir as ir

from eec.compiler.weights import store_once
from eec.errors import InputError
from eec.runtime.manifest import (MANIFEST, Manifest, PartSpec, hash_files, read_manifest, replace_dir,
                                  write_manifest)
from eec.runtime.staging import check_output, new_stage, output_lock


def split_artifact(src: str | Path, at: int, device_out: str | Path, server_out: str | Path,
                   overwrite: bool = False) -> tuple[Manifest, Manifest]:
    """Write the device part (layers up to the exit at ``at``) and the server part (the rest) of the
    artifact ``src``; returns their manifests."""
    src, device_out, server_out = Path(src), Path(device_out), Path(server_out)
    whole = read_manifest(src)
    if whole.part is not None:
        raise InputError(f"{src} is already the {whole.part.role} part of a split")
    cut = next((k + 1 for k, s in enumerate(whole.segments[:-1]) if s.exit is not None and s.exit.layer == at), None)
    if isinstance(at, bool) or cut is None:
        raise InputError(f"the split must be at an exit; this artifact's exits are {whole.exits}")
    if device_out.resolve() == server_out.resolve():
        raise InputError("the device part and the server part need two outputs")
    for out in (device_out, server_out):
        check_output(out, overwrite)
    fingerprint = hashlib.sha256((src / MANIFEST).read_bytes()).hexdigest()
    device = dataclasses.replace(whole, segments=whole.segments[:cut], engines=None, placement=None,
                                 part=PartSpec("device", at, fingerprint, whole.exits))
    server = dataclasses.replace(whole, segments=whole.segments[cut:], engines=None, placement=None, tokenizer=None,
                                 calibration=None, part=PartSpec("server", at, fingerprint, whole.exits))
    return _write(src, device, device_out), _write(src, server, server_out)


def _write(src: Path, manifest: Manifest, out: Path) -> Manifest:
    graphs = sorted({f for s in manifest.segments for f in s.graphs.values()}
                    | {s.exit.file for s in manifest.segments if s.exit and s.exit.file})
    others = [x.file for x in (manifest.tokenizer, manifest.calibration) if x is not None]
    with output_lock(out):
        stage = new_stage(out, "build")
        try:
            for name in graphs:  # each graph with its weights inline, then every weight stored once again
                model = ir.external_data.load_to_model(ir.load(src / name))
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                ir.save(model, stage / name, external_data=f"{Path(name).name}.data")
            folders = {str(Path(name).parent) for name in graphs}
            for folder in folders:
                store_once(stage / folder, [Path(name).name for name in graphs if str(Path(name).parent) == folder])
            for name in others:
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, stage / name)
            manifest = dataclasses.replace(manifest, files=hash_files(stage))
            write_manifest(stage, manifest)
            read_manifest(stage)  # the part is checked as any artifact is before it replaces anything
            replace_dir(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return manifest
