"""eec.runtime must run where only numpy, onnxruntime and tokenizers are installed: no torch, no compiler,
and none of the server's stack (a device running a split talks to its server with the standard library)."""

import subprocess
import sys

FORBIDDEN = ("torch", "transformers", "eec.compiler", "eec.train", "eec.cli", "onnx", "onnxscript", "eec.serve",
             "fastapi", "starlette", "uvicorn", "prometheus_client", "ray", "httpx")


def test_runtime_imports_no_torch_or_compiler():
    code = (
        "import sys, eec.runtime, eec.runtime.model, eec.runtime.core, eec.runtime.kv, eec.runtime.text, "
        "eec.runtime.classifier, eec.runtime.split, eec.runtime.engine; "
        f"print(' '.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"eec.runtime imported {out.stdout.strip()}"


def test_cli_generate_path_does_not_import_torch(llama_compiled):
    code = (
        "import sys; from typer.testing import CliRunner; from eec.cli.main import app; "
        f"r = CliRunner().invoke(app, ['generate', {str(llama_compiled.artifact)!r}, '1,2', '--ids', '--max-new-tokens', '2']); "
        "assert r.exit_code == 0, r.output; "
        f"print(' '.join(m for m in {tuple(m for m in FORBIDDEN if m != 'eec.cli')!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"eec generate imported {out.stdout.strip()}"
