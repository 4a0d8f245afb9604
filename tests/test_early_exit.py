"""Early exits: the exited token is the exit head's, and catch-up keeps every KV exact."""

import math

import numpy as np
import pytest

from eec.runtime import load
from tests.reference import exit_tokens, hf_forward

PROMPT = [7, 21, 3, 55, 11, 80, 2]


def check_tokens_against_transformers(hf, prompt, tokens, exits, heads=None):
    """Each generated token must be what the head it left through predicts from
    transformers' hidden state at that layer, for the sequence generated so far."""
    out = hf_forward(hf, prompt + tokens[:-1])
    cache = {}
    for i, (token, layer) in enumerate(zip(tokens, exits)):
        if layer not in cache:
            w = (heads or {}).get(layer)
            cache[layer] = exit_tokens(hf, out.hidden_states, layer, *(w if w else ()))
        assert token == cache[layer][len(prompt) - 1 + i], f"token {i} (exit at layer {layer})"


def test_minus_infinity_exits_every_token_at_first_exit(tiny_compiled):
    model = load(tiny_compiled.artifact)
    result = model.generate(PROMPT, max_new_tokens=16, thresholds=-math.inf)
    first = tiny_compiled.exits[0]
    n = tiny_compiled.hf.config.num_hidden_layers
    # The first token comes from the prompt pass, which runs every layer.
    assert result.exits == [n] + [first] * 15
    check_tokens_against_transformers(tiny_compiled.hf, PROMPT, result.tokens, result.exits)


def mixed_thresholds(model, prompt, steps=24):
    """Median confidence per exit over a run where no token exits: some tokens
    will then exit and some will not."""
    decoder = model.new_decoder()
    seen = {e: [] for e in model.exits}
    result = decoder.step(np.asarray([prompt]), None)
    for _ in range(steps):
        result = decoder.step(np.asarray([[result.token]]), {e: math.inf for e in model.exits}, trace=True)
        for e in model.exits:
            seen[e].append(result.scores[e][0])
    return {e: float(np.median(v)) for e, v in seen.items()}


def test_catch_up_fills_skipped_layers_kv_exactly(tiny_compiled):
    """On every tiny shape: biases (Qwen2), sliding-window config (Mistral), tied multi-head attention,
    and plain attention (head_dim 8, concatenated KV) as well as GroupQueryAttention (shared buffers)."""
    hf, model = tiny_compiled.hf, load(tiny_compiled.artifact)
    thresholds = mixed_thresholds(model, PROMPT)
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    layout = "shared" if head_dim % 16 == 0 else "concat"  # GroupQueryAttention's CPU kernel takes multiples of 16
    assert {spec.kv_cache for spec in model.manifest.segments} == {layout}
    decoder = model.new_decoder(capacity=len(PROMPT) + 2)  # the shared KV buffers grow several times on the way
    result = decoder.step(np.asarray([PROMPT]), None)
    tokens, exits = [result.token], [result.exit_layer]
    for _ in range(30):
        result = decoder.step(np.asarray([[tokens[-1]]]), thresholds)
        tokens.append(result.token)
        exits.append(result.exit_layer)
    n = hf.config.num_hidden_layers
    assert set(exits) - {n}, "no token exited early; the test would check nothing"
    assert exits.count(n) > 1, "every token exited early; catch-up was never exercised"
    check_tokens_against_transformers(hf, PROMPT, tokens, exits)

    # Every layer's KV equals transformers' cache for the sequence fed so far.
    sequence = PROMPT + tokens[:-1]
    cache = hf_forward(hf, sequence).past_key_values
    # A position missing from a segment waits in the pending list of the first segment without it, and
    # moves down a segment each time one runs it: a segment lacks what it and the segments above hold.
    waiting = 0
    for spec, state in zip(decoder.specs, decoder.states):
        waiting += 0 if state.pending[0] is None else len(state.pending[0])
        assert state.length + waiting == len(sequence)
        if layout == "shared":
            assert state.capacity > len(PROMPT) + 2, "the buffers never grew"
        for i, layer in enumerate(range(spec.start, spec.stop)):
            want_k = cache.layers[layer].keys[:, :, : state.length].numpy()
            want_v = cache.layers[layer].values[:, :, : state.length].numpy()
            np.testing.assert_allclose(state.kv[2 * i], want_k, atol=2e-4, rtol=1e-4)
            np.testing.assert_allclose(state.kv[2 * i + 1], want_v, atol=2e-4, rtol=1e-4)
    # And the early-exit run is a different trajectory from full decoding.
    assert model.generate(PROMPT, max_new_tokens=31, mode="full").tokens != tokens


def test_stats_count_exits(llama_compiled):
    model = load(llama_compiled.artifact)
    result = model.generate(PROMPT, max_new_tokens=12, thresholds=-math.inf)
    assert model.stats.new_tokens == 12
    assert model.stats.exits == {l: result.exits.count(l) for l in set(result.exits)}
    assert model.stats.tokens_per_s > 0


@pytest.mark.parametrize("bad, message", [
    ([0.5], r"1 thresholds for 3 exits \(\[1, 3, 4\]\)"),
    ({"9": 0.1}, r"no exit at layers \[9\]; this artifact's exits are \[1, 3, 4\]"),
    (float("nan"), "thresholds must be numbers, not NaN"),
])
def test_bad_thresholds_are_refused(llama_compiled, bad, message):
    from eec.errors import InputError

    model = load(llama_compiled.artifact)
    with pytest.raises(InputError, match=message):
        model.generate(PROMPT, max_new_tokens=2, thresholds=bad)


def test_long_calls_in_pieces_decode_the_same(tiny_compiled, monkeypatch):
    """A TensorRT session takes at most 8 positions a call, so prompts and catch-ups go in pieces
    (`max_call`): here 3 on CPU, against the same artifact in one call each."""
    from eec.runtime.kv import SegmentKV

    lengths = []
    for name in ("_call_shared", "_call_concat"):  # every call of several positions goes through one of them
        call = getattr(SegmentKV, name)
        monkeypatch.setattr(SegmentKV, name, lambda self, g, where, x, counts, call=call: (
            lengths.append((self.max_call, x.shape[1])), call(self, g, where, x, counts))[1])
    whole, pieces = load(tiny_compiled.artifact), load(tiny_compiled.artifact)
    assert whole.max_call is None  # onnxruntime's CPU provider: any length
    pieces.max_call = 3
    prompt = [5, 9, 13, 2, 44, 7, 80, 1]  # 8 positions: pieces of 3, 3 and 2
    for threshold in (0.2, 0.6):  # many exits before each deep token: catch-ups longer than 3
        a = whole.generate(prompt, max_new_tokens=20, thresholds=threshold)
        b = pieces.generate(prompt, max_new_tokens=20, thresholds=threshold)
        assert (a.tokens, a.exits) == (b.tokens, b.exits)
    exits = pieces.generate(prompt, max_new_tokens=20, thresholds=0.2).exits
    assert any(e < tiny_compiled.exits[0] + 1 for e in exits) and max(exits) == 6
    assert whole.generate(prompt, max_new_tokens=8, mode="full").tokens == \
        pieces.generate(prompt, max_new_tokens=8, mode="full").tokens
    assert max(n for limit, n in lengths if limit == 3) == 3  # never more than 3 a call...
    assert max(n for limit, n in lengths if limit is None) > 3  # ...where whole calls were longer
