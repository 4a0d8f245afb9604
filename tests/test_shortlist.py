"""Vocabulary shortlists for exit heads: the list, the numpy rescoring, and compiled shortlist heads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eec.calib.shortlist import HeadWeights, head_scores, rescore, shortlist_ids
from eec.calib.traces import Traces
from eec.compiler import compile_model
from eec.compiler.modules import ExitHead
from eec.errors import InputError
from eec.runtime import load


def test_shortlist_ids_rank_by_frequency_then_fill_with_low_ids():
    final = np.array([7, 7, 7, 3, 3, 9, 12, 12, 12, 12])
    assert shortlist_ids(final, 2, 20).tolist() == [7, 12]
    assert shortlist_ids(final, 4, 20).tolist() == [3, 7, 9, 12]  # all seen
    assert shortlist_ids(final, 6, 20).tolist() == [0, 1, 3, 7, 9, 12]  # topped up with the lowest unseen ids
    with pytest.raises(ValueError):
        shortlist_ids(final, 0, 20)


def test_numpy_head_scores_equal_the_pytorch_head():
    torch.manual_seed(0)
    hidden, vocab = 16, 40
    proj = torch.nn.Linear(hidden, vocab, bias=True)
    head = ExitHead(torch.rand(hidden) + 0.5, 1e-5, proj)
    weights = HeadWeights(head.norm.weight.detach().numpy(), 1e-5, proj.weight.detach().numpy(), proj.bias.detach().numpy())
    h = torch.randn(5, hidden)
    ids = torch.tensor([1, 4, 9, 16, 25, 36])
    for module, numpy_ids in ((head, None), (head.shortlisted(ids), ids.numpy())):
        with torch.no_grad():
            token, scores, *_ = module(h)
        got_token, got_scores = head_scores(weights, h.numpy(), numpy_ids)
        assert got_token.tolist() == token.tolist()
        np.testing.assert_allclose(got_scores, scores.numpy(), rtol=1e-4, atol=1e-5)
    assert set(head.shortlisted(ids)(h)[0].tolist()) <= set(ids.tolist())


def test_compiled_shortlist_heads_only_emit_listed_tokens_and_match_rescoring(llama_src):
    full = compile_model(llama_src / "hf", llama_src / "full.eec", exits=[2, 4], calibration_tokens=12)
    short = compile_model(llama_src / "hf", llama_src / "short.eec", exits=[2, 4], shortlist=16, calibration_tokens=12)
    assert [s.exit.shortlist for s in short.segments[:-1]] == [16, 16]
    full_traces = Traces.load(llama_src / "full.eec" / full.calibration.file)
    short_traces = Traces.load(llama_src / "short.eec" / short.calibration.file)
    ids = shortlist_ids(full_traces.final, 16, 96)
    # Same backbone, same prompts: the shortlist artifact's own traces are what rescoring predicts, with
    # the heads taken from transformers' model (its final norm and LM head at both exits).
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_src / "hf").eval()
    own = HeadWeights(hf.model.norm.weight.detach().numpy(), hf.config.rms_norm_eps,
                      hf.lm_head.weight.detach().numpy(), None)
    predicted = rescore(full_traces, {2: own, 4: own}, ids)
    np.testing.assert_array_equal(short_traces.final, full_traces.final)
    np.testing.assert_allclose(short_traces.scores[:, :, :3], predicted.scores[:, :, :3], atol=2e-3)
    assert (short_traces.agreed == predicted.agreed).mean() > 0.98
    # Never an exit on a token outside the list: every token leaves at the first exit here.
    model = load(llama_src / "short.eec")
    result = model.generate([3, 17, 42, 8], max_new_tokens=24, thresholds=-math.inf)
    exited = [t for t, e in zip(result.tokens, result.exits) if e < 6]
    assert len(exited) == 23 and set(exited) <= set(ids.tolist())
    # Each is the best listed token of transformers' layer-2 hidden state through the final norm and LM head.
    from tests.reference import hf_forward, rms_norm

    prompt = [3, 17, 42, 8]
    hidden = hf_forward(hf, prompt + result.tokens[:-1]).hidden_states[2][0]
    with torch.no_grad():
        logits = rms_norm(hidden, hf.model.norm.weight, hf.config.rms_norm_eps) @ hf.lm_head.weight.T
    listed = torch.as_tensor(ids)
    want = [int(listed[logits[len(prompt) - 1 + i, listed].argmax()]) for i in range(1, len(result.tokens))]
    assert result.tokens[1:] == want


def test_shortlist_auto_and_bad_input(llama_src, tmp_path):
    manifest = compile_model(llama_src / "hf", tmp_path / "auto.eec", exits="auto", shortlist="auto", calibration_tokens=12)
    placement = manifest.placement
    assert placement["shortlist"] in (0, 3, 12, 48)  # the whole vocabulary or 96 / (2, 8, 32)
    assert len({r["shortlist"] for r in placement["ranked"]}) > 1 or not placement["exits"]
    assert all(s.exit.shortlist == placement["shortlist"] for s in manifest.segments[:-1])
    assert placement["ranked"][0]["exits"] == placement["exits"]
    with pytest.raises(InputError, match="use it with --exits auto"):
        compile_model(llama_src / "hf", tmp_path / "x.eec", exits=[2], shortlist="auto")
    with pytest.raises(InputError, match="not smaller than the vocabulary"):
        compile_model(llama_src / "hf", tmp_path / "x.eec", exits=[2], shortlist=96)
    with pytest.raises(InputError, match="leave out --no-calibrate"):
        compile_model(llama_src / "hf", tmp_path / "x.eec", exits=[2], shortlist=8, calibrate=False)
