"""Sampling: drawn from the deciding head's top tokens as transformers' logits say, repeatable with a seed,
greedy at temperature 0 or top_k 1, the same alone and in a batch."""

import math

import numpy as np
import pytest
import torch

from eec.errors import InputError
from eec.runtime import load
from tests.reference import hf_forward, rms_norm

PROMPTS = [[3, 17, 42, 8, 91, 5], [60], list(range(10, 40)), [7, 7, 9]]


def reference_probs(logits: np.ndarray, temperature: float, top_k: int = 64, top_p: float = 1.0) -> np.ndarray:
    """What a draw should follow, over the whole vocabulary: softmax of the top-k logits at the
    temperature, cut to the fewest tokens whose mass reaches top_p."""
    order = np.argsort(-logits, kind="stable")[:top_k]
    z = logits[order] / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
    full = np.zeros_like(logits, dtype=np.float64)
    full[order[:keep]] = p[:keep] / p[:keep].sum()
    return full


def draws(model, prompt, n, **options):
    return np.array([model.generate(prompt, max_new_tokens=1, seed=s, **options).tokens[0] for s in range(n)])


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 8, None), (1.3, None, 0.8)])
def test_final_head_draws_follow_transformers_distribution(llama_compiled, temperature, top_k, top_p):
    hf, model = llama_compiled.hf, load(llama_compiled.artifact)
    prompt = PROMPTS[0]
    logits = hf_forward(hf, prompt).logits[0, -1].numpy()
    want = reference_probs(logits, temperature, top_k or 64, top_p or 1.0)
    got = draws(model, prompt, 3000, mode="full", temperature=temperature, top_k=top_k, top_p=top_p)
    assert set(got) <= set(np.flatnonzero(want)), "a token outside the kept set was drawn"
    freq = np.bincount(got, minlength=len(want)) / len(got)
    assert 0.5 * np.abs(freq - want).sum() < 0.05  # total variation; ~0.02 expected from 3000 draws


def test_an_exiting_token_is_drawn_from_its_exit_heads_top_logits(llama_compiled):
    """The top tokens a leaving row is drawn from are the exit head's, as transformers computes them."""
    hf, model = llama_compiled.hf, load(llama_compiled.artifact)
    first = llama_compiled.exits[0]
    batch = model.new_batch(rows=2)
    prompts = [PROMPTS[0], PROMPTS[2]]
    tokens = [r.token for r in batch.prefill([0, 1], prompts)]
    results = batch.step([0, 1], [[t] for t in tokens], {e: -math.inf for e in llama_compiled.exits}, sample=True)
    for prompt, token, result in zip(prompts, tokens, results):
        assert result.exit_layer == first
        hidden = hf_forward(hf, prompt + [token]).hidden_states[first][0, -1]
        with torch.no_grad():
            logits = (rms_norm(hidden, hf.model.norm.weight, hf.config.rms_norm_eps) @ hf.lm_head.weight.T).numpy()
        order = np.argsort(-logits, kind="stable")[:64]
        np.testing.assert_allclose(result.top_logits, logits[order], atol=1e-4, rtol=1e-4)
        assert result.top_ids[0] == result.token == order[0]
        assert set(result.top_ids[:60]) <= set(np.argsort(-logits)[:64])  # near-ties may swap at the cut


def test_seeds_repeat_alone_and_in_a_batch(llama_compiled):
    model = load(llama_compiled.artifact)
    options = dict(thresholds=0.4, max_new_tokens=12, temperature=0.9, top_p=0.95)
    alone = [model.generate(p, seed=i, **options) for i, p in enumerate(PROMPTS)]
    again = [model.generate(p, seed=i, **options) for i, p in enumerate(PROMPTS)]
    assert [r.tokens for r in again] == [r.tokens for r in alone]
    greedy = [model.generate(p, thresholds=0.4, max_new_tokens=12) for p in PROMPTS]
    assert any(a.tokens != g.tokens for a, g in zip(alone, greedy)), "sampling never left the greedy path"
    from eec.runtime.engine import Engine

    engine = Engine(model, max_batch=3)
    requests = [engine.submit(p, seed=i, **options) for i, p in enumerate(PROMPTS)]
    engine.run()
    assert [(r.result().tokens, r.result().exits) for r in requests] == [(r.tokens, r.exits) for r in alone]


@pytest.mark.parametrize("options", [dict(temperature=0), dict(top_k=1), dict(top_k=1, temperature=2.0, seed=4)])
def test_temperature_zero_and_top_k_one_are_greedy(llama_compiled, options):
    model = load(llama_compiled.artifact)
    greedy = model.generate(PROMPTS, thresholds=0.4, max_new_tokens=10)
    assert [r.tokens for r in model.generate(PROMPTS, thresholds=0.4, max_new_tokens=10, **options)] == \
        [r.tokens for r in greedy]


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed=-3), "seed"),
    (dict(seed=1, mode="speculative"), "does not sample"),
])
def test_bad_sampling_options(llama_compiled, options, message):
    model = load(llama_compiled.artifact)
    with pytest.raises(InputError, match=message):
        model.generate(PROMPTS[0], max_new_tokens=2, **options)
