"""Speculative mode (`eec.runtime.speculative`): the exit drafts, the deeper layers verify, and the
tokens are full mode's, whatever the exit proposes and however far it drafts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eec.errors import InputError
from eec.runtime import load

PROMPTS = ([5, 17, 3, 60, 2], [41, 8])


def _full(model, prompt, n=24):
    return model.generate(prompt, max_new_tokens=n, mode="full", ignore_eos=True).tokens


@pytest.mark.parametrize("draft_layer", [2, 4])
@pytest.mark.parametrize("max_draft", [1, 3, 6])
def test_speculative_equals_full_mode(tiny_compiled, draft_layer, max_draft):
    """Threshold 0 drafts as far as allowed: random heads are mostly wrong, so most cycles roll back."""
    model = load(tiny_compiled.artifact)
    assert model.manifest.segments[-1].graph("verify")  # written by default for a small artifact
    drafted = accepted = 0
    for prompt in PROMPTS:
        got = model.generate(prompt, max_new_tokens=24, mode="speculative", thresholds=0.0, ignore_eos=True,
                             max_draft=max_draft, draft_layer=draft_layer)
        drafted, accepted = drafted + model.stats.drafted, accepted + model.stats.accepted
        assert got.tokens == _full(model, prompt)
        assert got.exits == [model.num_layers] * 24
    assert 0 <= accepted < drafted  # rejected drafts were rolled back
    if max_draft == 1:
        assert drafted == 2 * 23  # one draft per token after the prompt's


def test_thresholds_end_the_drafts(tiny_compiled):
    """A threshold no score reaches drafts one token a cycle: full mode, one verify per token."""
    model = load(tiny_compiled.artifact)
    got = model.generate(PROMPTS[0], max_new_tokens=12, mode="speculative", thresholds=math.inf, ignore_eos=True,
                         max_draft=6)
    assert model.stats.drafted == 11
    assert got.tokens == _full(model, PROMPTS[0], 12)


def test_drafts_the_full_model_agrees_with_are_all_kept(exit_is_final):
    model = load(exit_is_final)
    got = model.generate(PROMPTS[0], max_new_tokens=20, mode="speculative", thresholds=0.0, ignore_eos=True,
                         max_draft=4)
    assert model.stats.drafted == model.stats.accepted == 19  # 19 tokens after the prompt's, all drafted
    assert got.tokens == _full(model, PROMPTS[0], 20)


def test_a_prefix_is_kept_and_the_rest_rolled_back(tiny_compiled):
    """Each segment's KV after a cycle holds the positions of the emitted tokens alone."""
    from eec.runtime.speculative import cycle

    model = load(tiny_compiled.artifact)
    decoder = model.new_decoder(64, speculative=True)
    first = decoder.step(np.asarray([PROMPTS[0]], dtype=np.int64), None).token
    step = cycle(decoder, first, 0, 0.0, 0, 5)
    assert step.drafted == 5 and 1 <= len(step.tokens) <= 5 and step.accepted == len(step.tokens) - (len(step.tokens) < 5)
    assert {s.length for s in decoder.states} == {len(PROMPTS[0]) + len(step.tokens)}
    assert [first, *step.tokens] == _full(model, PROMPTS[0], 1 + len(step.tokens))


def test_speculative_needs_what_it_drafts_and_verifies_with(tmp_path, llama_src):
    from eec.compiler import compile_model

    compile_model(llama_src / "hf", tmp_path / "off.eec", exits=[2], calibrate=False, speculative="off")
    model = load(tmp_path / "off.eec")
    assert model.manifest.segments[-1].graph("verify") is None
    with pytest.raises(InputError, match="--speculative on"):
        model.generate(PROMPTS[0], max_new_tokens=4, mode="speculative")
    compile_model(llama_src / "hf", tmp_path / "on.eec", exits=[2, 4], calibrate=False, catch_up="propagate")
    model = load(tmp_path / "on.eec")
    with pytest.raises(InputError, match="no exit at layer 3"):
        model.generate(PROMPTS[0], max_new_tokens=4, mode="speculative", draft_layer=3)
    with pytest.raises(InputError, match="exact catch-up"):
        model.generate(PROMPTS[0], max_new_tokens=4, mode="speculative")
    with pytest.raises(InputError, match="max_draft"):
        model.generate(PROMPTS[0], max_new_tokens=4, mode="speculative", catch_up="exact", max_draft=0)
    got = model.generate(PROMPTS[0], max_new_tokens=8, mode="speculative", catch_up="exact", ignore_eos=True)
    assert got.tokens == _full(model, PROMPTS[0], 8)


def test_monitor_counts_the_exited_tokens_the_full_model_agrees_with(tiny_compiled):
    """Checked live as the catch-up reaches the last segment; the reference is full mode run
    teacher-forced on the early-exit generation itself."""
    from eec.runtime.evaluate import teacher_forced

    model = load(tiny_compiled.artifact)
    judged_total = 0
    for threshold in (0.1, 0.2, 0.35, 0.5):
        plain = model.generate(PROMPTS[0], max_new_tokens=40, thresholds=threshold, ignore_eos=True)
        got = model.generate(PROMPTS[0], max_new_tokens=40, thresholds=threshold, ignore_eos=True, monitor=True)
        checked, agreed = model.stats.checked, model.stats.agreed
        assert got.tokens == plain.tokens and got.exits == plain.exits  # monitoring changes nothing
        full, _ = teacher_forced(model, PROMPTS[0], got.tokens)  # the full model's token at each position
        deep = [i for i, layer in enumerate(got.exits) if layer == model.num_layers]
        judged = [i for i, layer in enumerate(got.exits) if layer < model.num_layers and deep and i < deep[-1]]
        assert checked == len(judged)
        assert agreed == sum(full[i] == got.tokens[i] for i in judged)
        judged_total += len(judged)
    assert judged_total > 0  # some thresholds let tokens exit before a deep one


def test_monitor_needs_the_verify_graph_and_the_exact_catch_up(tmp_path, llama_src):
    from eec.compiler import compile_model

    compile_model(llama_src / "hf", tmp_path / "off.eec", exits=[2], calibrate=False, speculative="off")
    with pytest.raises(InputError, match="no verify graph"):
        load(tmp_path / "off.eec").generate(PROMPTS[0], max_new_tokens=4, thresholds=0.5, monitor=True)
    with pytest.raises(InputError, match="early-exit"):
        load(tmp_path / "off.eec").generate(PROMPTS[0], max_new_tokens=4, mode="full", monitor=True)
