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
