"""Process faults while writing an artifact: SIGTERM, a killed writer's left-overs, two writers at once
(`eec.runtime.staging`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eec.compiler import compile_model
from eec.errors import InputError
from eec.runtime import load
from eec.runtime.staging import output_lock
from tests.test_cli_errors import run_fails


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from tests.conftest import tiny_model

    d = tmp_path_factory.mktemp("faults-hf") / "tiny"
    tiny_model("llama").save_pretrained(d)
    return d


def eec(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "eec", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])


def wait_for(folder: Path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the command ended before {pattern} appeared: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{pattern} never appeared")


def test_sigterm_during_compile_removes_the_staging_folder(hf_dir, tmp_path):
    proc = eec("compile", hf_dir, "-o", tmp_path / "a.eec", "--exits", "2,4")
    wait_for(tmp_path, ".a.eec.build-*", proc)
    time.sleep(0.5)  # into the export
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "terminated" and "Traceback" not in stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_sigterm_during_calibrate_keeps_the_artifact_as_it_was(hf_dir, tmp_path):
    art = tmp_path / "a.eec"
    compile_model(hf_dir, art, exits=[2, 4], calibrate=False)
    before = sorted(os.listdir(art))
    proc = eec("calibrate", art, "--max-new-tokens", "48")
    wait_for(tmp_path, ".a.eec.calib-*", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert sorted(os.listdir(tmp_path)) == ["a.eec"]
    assert sorted(os.listdir(art)) == before
    assert load(art).manifest.calibration is None  # the hashes hold: nothing of the stopped run got in


def test_a_killed_writers_staging_folders_are_removed_by_the_next_compile(hf_dir, tmp_path):
    for stale in (".a.eec.build-x1", ".a.eec.calib-x2", ".a.eec.old-123"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "seg0.onnx.data").write_bytes(b"\0" * 1000)
    (tmp_path / ".b.eec.build-x3").mkdir()  # another output's: not this compile's to remove
    compile_model(hf_dir, tmp_path / "a.eec", exits=[2], calibrate=False)
    assert sorted(os.listdir(tmp_path)) == [".b.eec.build-x3", "a.eec"]


def test_a_second_writer_to_the_same_output_is_refused(hf_dir, tmp_path):
    out = tmp_path / "a.eec"
    with output_lock(out):
        line = run_fails(["compile", hf_dir, "-o", out], "another eec process", f"(pid {os.getpid()})")
        assert str(out) in line
        with pytest.raises(InputError, match="another eec process"):
            compile_model(hf_dir, out, calibrate=False)
    assert sorted(os.listdir(tmp_path)) == []  # the lock file goes with its holder
    compile_model(hf_dir, out, exits=[2], calibrate=False)  # and the next writer gets through


@pytest.mark.slow  # 30 s; the lock that makes it so is checked by test_a_second_writer_to_the_same_output_is_refused
def test_two_compiles_to_one_output_at_once_write_it_once(hf_dir, tmp_path):
    out = tmp_path / "a.eec"
    procs = [eec("compile", hf_dir, "-o", out, "--exits", "2", "--no-calibrate") for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()) for p in procs]
    wrote = [rc for rc, (stdout, stderr) in results if rc == 0]
    refused = [stderr for rc, (stdout, stderr) in results if rc == 1]
    assert len(wrote) == 1 and len(refused) == 1, results
    assert "another eec process" in refused[0] or "already exists" in refused[0]
    load(out)
    assert sorted(os.listdir(tmp_path)) == ["a.eec"]


def test_the_lock_needs_an_existing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        with output_lock(tmp_path / "missing" / "a.eec"):
            pass
