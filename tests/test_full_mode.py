"""mode="full" reproduces transformers' greedy decoding token for token (fp32)."""

import pytest

from eec.runtime import load
from tests.reference import hf_greedy

PROMPTS = [[3, 17, 42, 8, 91, 5], [60], list(range(10, 40))]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "one-token", "long"])
def test_full_mode_equals_transformers_greedy(tiny_compiled, prompt):
    model = load(tiny_compiled.artifact)
    result = model.generate(prompt, max_new_tokens=24, mode="full")
    assert result.tokens == hf_greedy(tiny_compiled.hf, prompt, 24)
    assert result.exits == [tiny_compiled.hf.config.num_hidden_layers] * 24


def test_infinite_thresholds_give_full_output(tiny_compiled):
    model = load(tiny_compiled.artifact)
    prompt = PROMPTS[0]
    full = model.generate(prompt, max_new_tokens=20, mode="full")
    never = model.generate(prompt, max_new_tokens=20, thresholds=float("inf"))
    assert never.tokens == full.tokens
    assert set(never.exits) == {tiny_compiled.hf.config.num_hidden_layers}


@pytest.mark.parametrize("scale", [1.01, 1.0005])
def test_a_graph_that_disagrees_with_pytorch_is_never_written(llama_src, tmp_path, monkeypatch, scale):
    """The compiler runs every graph it writes against the PyTorch module it came from. A graph whose
    weights were altered after export (one initializer scaled by ``scale``, 1% or 0.05%) must stop
    the compile with that message, and leave no artifact behind."""
    import numpy as np
    import onnx_ir as ir

    import eec.compiler.export as export
    from eec.compiler import compile_model
    from eec.errors import CompileError

    real = export.DropUnusedNormOutputs

    class Altered(real):
        def __call__(self, model):
            result = real.__call__(self, model)
            weights = [v for v in model.graph.initializers.values()
                       if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
                       and v.const_value.size > 1000]
            value = weights[0]
            value.const_value = ir.tensor(value.const_value.numpy() * np.float32(scale), name=value.name)
            return result

    monkeypatch.setattr(export, "DropUnusedNormOutputs", Altered)
    monkeypatch.setattr(export.EXPORTS, "limit", 0)  # a graph kept from an earlier compile would skip the alteration
    out = tmp_path / "altered.eec"
    with pytest.raises(CompileError, match=r"disagrees with PyTorch on \w+ \(relative error"):
        compile_model(llama_src / "hf", out, exits=[2], calibrate=False)
    assert not out.exists() and not list(tmp_path.glob(".*"))
