"""User mistakes: one line on stderr, exit status 1, no traceback, nothing half-written."""

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eec.cli.main import app

runner = CliRunner()


PROGRESS = re.compile(r"^\[\d\d:\d\d\] ")  # a long command's plain progress lines when not on a terminal


def run_fails(args, *expected):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    from tests.conftest import tiny_model

    d = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_model("llama").save_pretrained(d)
    return d


def test_missing_model_path(tmp_path):
    run_fails(["compile", tmp_path / "nope", "-o", tmp_path / "a.eec"], "no such file")
    assert leftovers(tmp_path) == []


def test_file_that_is_not_a_model(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a model")
    run_fails(["compile", junk, "-o", tmp_path / "a.eec"], "not a readable eec checkpoint", "a .gguf file")
    assert leftovers(tmp_path) == ["notes.txt"]


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    run_fails(["compile", tmp_path / "empty", "-o", tmp_path / "a.eec"], "config.json")


def test_broken_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x00garbage")
    run_fails(["compile", bad, "-o", tmp_path / "a.eec"], "GGUF")
    assert leftovers(tmp_path) == ["model.gguf"]


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    run_fails(["compile", tmp_path / "gpt2", "-o", tmp_path / "a.eec"], "'gpt2' is not supported", "llama")


@pytest.mark.parametrize(
    "exits, message",
    [("2,2", "repeated"), ("0", "out of range"), ("6", "out of range"), ("3,99", "out of range"), ("a,b", "comma")],
)
def test_bad_exit_layers(tiny_hf_dir, tmp_path, exits, message):
    run_fails(["compile", tiny_hf_dir, "-o", tmp_path / "a.eec", "--exits", exits], message)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args, message",
    [(["--exits", "2,4", "--candidates", "1,2"], "use them with --exits auto"),
     (["--exits", "auto", "--candidates", "1,x"], "comma"),
     (["--exits", "auto", "--candidates", "1,9"], "out of range"),
     (["--exits", "2,4", "--batch", "8"], "use it with --exits auto"),
     (["--exits", "auto", "--batch", "0"], "at least 1"),
     (["--exits", "auto", "--batch", "8", "--catch-up", "propagate"], "exact catch-up")],
)
def test_bad_candidates(tiny_hf_dir, tmp_path, args, message):
    run_fails(["compile", tiny_hf_dir, "-o", tmp_path / "a.eec", *args], message)
    assert leftovers(tmp_path) == []


def test_unknown_metric_is_refused_before_compiling(tiny_hf_dir, tmp_path):
    run_fails(["compile", tiny_hf_dir, "-o", tmp_path / "a.eec", "--metric", "vibes"], "unknown metric", "top2-margin")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["--calibration-tokens", "1"], "--calibration-tokens must be a whole number of at least 2, got 1"),
    (["--block-size", "48"], "--block-size must be a power of two"),
    (["--batch", "4"], "use it with --exits auto"),
])
def test_compile_options_are_refused_before_the_model_loads(tiny_hf_dir, tmp_path, monkeypatch, args, message):
    import eec.compiler.pipeline as pipeline

    def loaded(*_args):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(pipeline, "load_source", loaded)
    run_fails(["compile", tiny_hf_dir, "-o", tmp_path / "a.eec", *args], message)
    assert leftovers(tmp_path) == []


def test_unknown_target_lists_known_ones(tiny_hf_dir, tmp_path):
    run_fails(["compile", tiny_hf_dir, "-o", tmp_path / "a.eec", "--target", "tpu-v9"], "unknown target", "cpu")


def test_failed_compile_leaves_nothing(tiny_hf_dir, tmp_path, monkeypatch):
    import eec.compiler.pipeline as pipeline
    from eec.errors import CompileError

    def broken(*_args):
        raise CompileError("simulated failure in the last step")

    monkeypatch.setattr(pipeline, "export_head", broken)
    run_fails(["compile", tiny_hf_dir, "-o", tmp_path / "a.eec", "--exits", "3"], "simulated")
    assert leftovers(tmp_path) == []


def test_existing_output_is_not_replaced_silently(llama_compiled, tiny_hf_dir):
    run_fails(["compile", tiny_hf_dir, "-o", llama_compiled.artifact], "already exists", "--overwrite")


def test_tampered_artifact(llama_compiled, tmp_path):
    copy = tmp_path / "copy.eec"
    shutil.copytree(llama_compiled.artifact, copy)
    data = copy / "graphs" / "weights.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    run_fails(["generate", copy, "1,2,3", "--ids"], "sha256")
    run_fails(["inspect", copy], "sha256")


def test_missing_artifact(tmp_path):
    run_fails(["generate", tmp_path / "none.eec", "1,2", "--ids"], "no artifact")
    (tmp_path / "dir").mkdir()
    run_fails(["inspect", tmp_path / "dir"], "not an eec artifact")


def test_prompt_longer_than_context(llama_compiled):
    context = llama_compiled.hf.config.max_position_embeddings
    ids = ",".join(["5"] * (context + 3))
    run_fails(["generate", llama_compiled.artifact, ids, "--ids"], f"context is {context} tokens")


def test_text_prompt_without_tokenizer(llama_compiled):
    run_fails(["generate", llama_compiled.artifact, "hello"], "no tokenizer")


@pytest.mark.parametrize(
    "extra, message",
    [(["--threshold", "high"], "--threshold"), (["--mode", "fast"], "mode"), (["--max-new-tokens", "0"], "at least 1")],
)
def test_bad_generate_options(llama_compiled, extra, message):
    run_fails(["generate", llama_compiled.artifact, "1,2,3", "--ids", *extra], message)


def test_generate_and_inspect_work(llama_compiled):
    result = runner.invoke(app, ["generate", str(llama_compiled.artifact), "1,2,3", "--ids", "--max-new-tokens", "5", "--mode", "full"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split()) == 5
    assert "5 tokens" in result.stderr
    result = runner.invoke(app, ["inspect", str(llama_compiled.artifact)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "exits: 1, 3, 4" in result.stdout
    assert "graphs/seg0_with_head.onnx" in result.stdout  # a tiny model's heads are fused by default
    assert "calibrated on 32 prompts" in result.stdout  # eec's own prompts for an artifact without a tokenizer


def test_bad_catch_up(tiny_hf_dir, llama_compiled, tmp_path):
    run_fails(["compile", tiny_hf_dir, "-o", tmp_path / "a.eec", "--catch-up", "lazy"], "--catch-up", "exact, propagate")
    assert leftovers(tmp_path) == []
    run_fails(["generate", llama_compiled.artifact, "1,2,3", "--ids", "--catch-up", "propagate"], "fill graphs")


def test_bad_fuse_heads(tiny_hf_dir, tmp_path):
    run_fails(["compile", tiny_hf_dir, "-o", tmp_path / "a.eec", "--fuse-heads", "sometimes"], "--fuse-heads",
              "auto, on, off")
    assert leftovers(tmp_path) == []


def test_bad_speculative(tiny_hf_dir, llama_compiled, tmp_path):
    run_fails(["compile", tiny_hf_dir, "-o", tmp_path / "a.eec", "--speculative", "maybe"], "--speculative",
              "auto, on, off")
    assert leftovers(tmp_path) == []
    run_fails(["generate", llama_compiled.artifact, "1,2,3", "--ids", "--mode", "speculative", "--draft-layer", "2"],
              "no exit at layer 2")
    run_fails(["profile", llama_compiled.artifact, "--draft-layer", "2"], "--draft-layer 2", "exits (1, 3, 4)")


def test_speculative_generate_gives_full_mode_tokens(llama_compiled):
    def tokens(*extra):
        result = runner.invoke(app, ["generate", str(llama_compiled.artifact), "1,2,3", "--ids", "--max-new-tokens", "12",
                                     *extra])
        assert result.exit_code == 0, result.output
        return result.stdout.split(), result.stderr

    full, _ = tokens("--mode", "full")
    speculative, stats = tokens("--mode", "speculative", "--threshold", "0", "--max-draft", "3")
    assert speculative == full and "drafts accepted" in stats
    result = runner.invoke(app, ["inspect", str(llama_compiled.artifact)], env={"COLUMNS": "200"})
    assert "speculative verify" in result.stdout
    monitored, stats = tokens("--threshold", "0.3", "--monitor")
    assert monitored != full and "exited tokens the final head agrees with" in stats  # this random model: 4 checked


@pytest.mark.parametrize("command", [["compile", "model.pt", "-o", "out.eec"], ["train", "model.gguf", "--exits", "2", "-o", "m.pt"]])
def test_a_runtime_only_install_is_told_to_install_the_compile_extra(tmp_path, command):
    """Without torch and transformers (`pip install eec`), compile and train say which extra to install."""
    import subprocess
    import sys

    code = ("import sys\nfor m in ('torch', 'transformers'): sys.modules[m] = None\n"
            f"from eec.cli.main import app\napp({command!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'eec[compile]'" in lines[0] and "is not installed" in lines[0], done.stderr


def test_an_error_message_keeps_its_brackets(monkeypatch, tmp_path):
    """rich's markup would read "[plot]" as a tag and eat it: messages are printed as they are."""
    import eec.runtime
    from eec.errors import InputError

    def refuse(*args, **kwargs):
        raise InputError("--plot needs matplotlib: pip install 'eec[plot]'")

    monkeypatch.setattr(eec.runtime, "load", refuse)
    run_fails(["generate", tmp_path, "x"], "pip install 'eec[plot]'")


def test_classifier_meaning_flags_on_a_decoder(tiny_hf_dir, llama_compiled, tmp_path):
    run_fails(["compile", tiny_hf_dir, "-o", tmp_path / "x.eec", "--rule", "joint"], "for classifier networks")
    run_fails(["calibrate", llama_compiled.artifact, "--criterion", "accuracy"], "for classifier artifacts")
    run_fails(["profile", llama_compiled.artifact, "--batch", "0,8"], "--batch must be whole numbers of at least 1")
    assert not (tmp_path / "x.eec").exists()


def test_generate_reports_the_bandwidth_its_tokens_read(llama_compiled):
    """Full mode reads every layer's matrices and the final head per token: GB/s = their bytes (fp32, counted
    from the transformers model) x tokens/s, both as printed."""
    result = runner.invoke(app, ["generate", str(llama_compiled.artifact), "1,2,3", "--ids", "--max-new-tokens", "40",
                                 "--mode", "full"])
    assert result.exit_code == 0, result.output
    tok_s = float(re.search(r"([\d.]+) tok/s decode", result.stderr).group(1))
    gb_s = float(re.search(r"weights read at ([\d.]+) GB/s", result.stderr).group(1))
    hf = llama_compiled.hf
    matrices = sum(p.numel() for n, p in hf.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    assert gb_s == pytest.approx(matrices * 4 * tok_s / 1e9, abs=0.006, rel=0.01)
