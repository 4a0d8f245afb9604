"""The propagating catch-up (`--catch-up propagate`): the KV of exited positions in the layers they
skipped comes from their exit's hidden state, checked against transformers' own projections."""

import math

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from eec.compiler import compile_model
from eec.errors import InputError
from eec.runtime import load
from tests.conftest import TINY_SHAPES, tiny_model
from tests.reference import hf_greedy, propagated_forward, rms_norm
from tests.test_early_exit import check_tokens_against_transformers, mixed_thresholds

PROMPT = [7, 21, 3, 55, 11, 80, 2]
EXITS = [2, 4]


@pytest.fixture(scope="module", params=["llama-gqa-untied", "llama-gqa-hd8"])
def propagating(request, tmp_path_factory):
    """A tiny model compiled with fill graphs: GroupQueryAttention (shared KV buffers) and plain ops (head_dim 8)."""
    model_type, overrides = TINY_SHAPES[request.param]
    hf = tiny_model(model_type, **overrides)
    root = tmp_path_factory.mktemp("propagate")
    hf.save_pretrained(root / "hf")
    compile_model(root / "hf", root / "p.eec", exits=EXITS, catch_up="propagate", calibrate=False)
    return hf, root / "p.eec"


def projected_kv(hf, layer: int, hidden: torch.Tensor, position: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' keys (after rotary) and values of ``layer`` for one position whose input is ``hidden``."""
    block, cfg = hf.model.layers[layer], hf.config
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        x = block.input_layernorm(hidden.reshape(1, 1, -1))
        k = block.self_attn.k_proj(x).view(1, 1, kv_heads, head_dim).transpose(1, 2)
        v = block.self_attn.v_proj(x).view(1, 1, kv_heads, head_dim).transpose(1, 2)
        cos, sin = hf.model.rotary_emb(x, torch.tensor([[position]]))
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k[0, :, 0].numpy(), v[0, :, 0].numpy()


def test_skipped_layers_kv_is_projected_from_the_exit_hidden_state(propagating):
    hf, artifact = propagating
    model = load(artifact)
    assert model.catch_up == "propagate"
    decoder = model.new_decoder(capacity=len(PROMPT) + 1)  # the buffers grow on the way (shared KV)
    result = decoder.step(np.asarray([PROMPT]), None)
    leave = {e: -math.inf for e in EXITS}
    exited = {}  # position -> hidden state at the first exit
    for i in range(5):
        result = decoder.step(np.asarray([[result.token]]), leave, trace=True)
        assert result.exit_layer == EXITS[0]
        exited[len(PROMPT) + i] = torch.from_numpy(np.array(result.hidden[EXITS[0]]))
    seen = {s.spec.start: s.length for s in decoder.states}
    stay = {e: math.inf for e in EXITS}
    result = decoder.step(np.asarray([[result.token]]), stay)  # goes through every layer: fills first
    n = hf.config.num_hidden_layers
    assert result.exit_layer == n
    total = len(PROMPT) + len(exited) + 1
    for spec, state in zip(decoder.specs, decoder.states):
        assert state.length == total and state.pending[0] is None
        if spec.start == 0:
            continue
        assert seen[spec.start] == len(PROMPT), "the exited positions were caught up before the test"
        for i, layer in enumerate(range(spec.start, spec.stop)):
            for position, hidden in exited.items():
                want_k, want_v = projected_kv(hf, layer, hidden, position)
                np.testing.assert_allclose(state.kv[2 * i][0, :, position], want_k, atol=2e-4, rtol=1e-4)
                np.testing.assert_allclose(state.kv[2 * i + 1][0, :, position], want_v, atol=2e-4, rtol=1e-4)


def test_first_layer_after_the_exit_is_exact_and_deeper_ones_are_not(propagating):
    """Layer 2's input is the exit's hidden state, so propagation reproduces the exact catch-up there;
    layer 3 reads layer 2's output in the full model, which propagation does not compute."""
    _, artifact = propagating
    states = {}
    for catch_up in ("exact", "propagate"):
        decoder = load(artifact).new_decoder(catch_up=catch_up)
        result = decoder.step(np.asarray([PROMPT]), None)
        for thresholds in [{2: -math.inf}] * 4 + [{2: math.inf, 4: math.inf}]:
            result = decoder.step(np.asarray([[result.token]]), thresholds)
        states[catch_up] = decoder.states[1]
    exact, propagated = states["exact"], states["propagate"]
    assert exact.length == propagated.length == len(PROMPT) + 5
    np.testing.assert_allclose(propagated.kv[0], exact.kv[0], atol=1e-5, rtol=1e-5)  # layer 2 keys
    np.testing.assert_allclose(propagated.kv[1], exact.kv[1], atol=1e-5, rtol=1e-5)  # layer 2 values
    exited = slice(len(PROMPT), len(PROMPT) + 4)
    assert not np.allclose(propagated.kv[2][:, :, exited], exact.kv[2][:, :, exited], atol=1e-3)  # layer 3 keys


def test_both_catch_ups_decode_what_transformers_computes_for_them(propagating):
    """Thresholds at which some tokens exit and others go deep, from one artifact: with the exact
    catch-up every token is what transformers computes for the sequence so far; with propagation,
    what transformers computes when each exited position enters the layers it skipped with its
    exit's hidden state (CALM). The deep tokens are the ones that read a caught-up KV."""
    hf, artifact = propagating
    model = load(artifact)
    n = hf.config.num_hidden_layers
    thresholds = mixed_thresholds(model, PROMPT)
    full = model.generate(PROMPT, max_new_tokens=12, mode="full")
    assert full.tokens == hf_greedy(hf, PROMPT, 12)
    runs = {c: model.generate(PROMPT, max_new_tokens=24, thresholds=thresholds, catch_up=c)
            for c in ("exact", "propagate")}
    for catch_up, run in runs.items():
        deep_after_exit = [i for i in range(1, len(run.exits)) if run.exits[i] == n and min(run.exits[1:i], default=n) < n]
        assert deep_after_exit and set(run.exits[1:]) & set(EXITS), f"{catch_up}: {run.exits}"
    exact = runs["exact"]
    check_tokens_against_transformers(hf, PROMPT, exact.tokens, exact.exits)
    run = runs["propagate"]
    sequence = PROMPT + run.tokens[:-1]
    exited = {len(PROMPT) - 1 + i: e for i, e in enumerate(run.exits) if e < n}
    logits, inputs = propagated_forward(hf, sequence, exited)
    for i, (token, layer) in enumerate(zip(run.tokens, run.exits)):
        position = len(PROMPT) - 1 + i
        if layer == n:
            want = int(logits[position].argmax())
        else:
            h = inputs[layer][0, position]
            want = int((rms_norm(h, hf.model.norm.weight, hf.config.rms_norm_eps) @ hf.lm_head.weight.T).argmax())
        assert token == want, f"token {i} (exit at layer {layer})"


def test_propagate_needs_fill_graphs(llama_compiled):
    with pytest.raises(InputError, match="--catch-up propagate"):
        load(llama_compiled.artifact, catch_up="propagate")
    model = load(llama_compiled.artifact)
    assert model.catch_up == "exact"
    with pytest.raises(InputError, match="catch-up must be one of"):
        model.generate(PROMPT, max_new_tokens=2, catch_up="lazy")


def test_measure_times_the_fill_graphs(propagating):
    from eec.targets.latency import LatencyTable
    from eec.targets.measure import measure_artifact

    _, artifact = propagating
    table = measure_artifact(artifact, past=16, repeats=2)
    assert sorted(table.fills) == [(2, 4), (4, 6)]  # every segment after the first, as measured segments are
    assert all(len(t) == 8 and min(t) > 0 for t in table.fills.values())
    assert table.fill_costs(2, 6) is not None and table.fill_costs(0, 6) is None
    assert LatencyTable.from_json(table.to_json()).fills == table.fills


def test_propagated_catch_up_in_pieces_decodes_the_same(propagating, monkeypatch):
    from eec.runtime.kv import FILL, SegmentKV

    fills, pieces_run = [], []
    call, call_one = SegmentKV.call, SegmentKV._call_one
    monkeypatch.setattr(SegmentKV, "call", lambda self, role, slots, x, counts=None: (
        role == FILL and fills.append((self.max_call, x.shape[1])), call(self, role, slots, x, counts))[1])
    monkeypatch.setattr(SegmentKV, "_call_one", lambda self, graph, slot, x: (
        pieces_run.append((self.max_call, x.shape[1])), call_one(self, graph, slot, x))[1])
    _, artifact = propagating
    whole, pieces = load(artifact), load(artifact)
    pieces.max_call = 2  # fills of more than 2 exited positions go in pieces
    for threshold in (0.1, 0.4):
        a = whole.generate(PROMPT, max_new_tokens=16, thresholds=threshold)
        b = pieces.generate(PROMPT, max_new_tokens=16, thresholds=threshold)
        assert (a.tokens, a.exits) == (b.tokens, b.exits)
    assert max(n for limit, n in fills if limit is None) > 2, "no fill longer than a piece: nothing was split"
    assert max(n for limit, n in fills if limit == 2) > 2
    assert max(n for limit, n in pieces_run if limit == 2) <= 2
