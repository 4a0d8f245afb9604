"""Where generation stops, in every mode: the end-of-sequence token when an exit emits it, in the middle
of a speculative draft, and the model's context. The reference is always the same generation let run
(end of sequence ignored), cut by hand where it should have stopped."""

from __future__ import annotations

import dataclasses

import pytest

from eec.runtime import load
from tests.test_early_exit import PROMPT, mixed_thresholds

PROMPTS = [PROMPT, [41, 8, 19], [60]]


def first_new(tokens: list[int], where) -> int:
    """The first index i where ``where(i)`` holds and tokens[i] is not seen before i: an end-of-sequence
    token chosen there stops the generation exactly at i."""
    return next(i for i in range(1, len(tokens)) if where(i) and tokens.index(tokens[i]) == i)


def with_eos(model, token: int):
    model.manifest = dataclasses.replace(model.manifest, eos_token_ids=[token])
    return model


def test_an_exit_that_emits_the_end_of_sequence_stops_its_row(llama_compiled):
    model = load(llama_compiled.artifact)
    thresholds = mixed_thresholds(model, PROMPT)
    free = model.generate(PROMPTS, thresholds=thresholds, max_new_tokens=24, ignore_eos=True)
    n = model.num_layers
    k = first_new(free[0].tokens, lambda i: free[0].exits[i] < n)  # the token leaves at an exit, not the last layer
    eos = free[0].tokens[k]
    stopped = with_eos(model, eos).generate(PROMPTS, thresholds=thresholds, max_new_tokens=24)
    for f, s in zip(free, stopped):
        cut = f.tokens.index(eos) + 1 if eos in f.tokens else len(f.tokens)
        assert (s.tokens, s.exits) == (f.tokens[:cut], f.exits[:cut])
        assert s.finish_reason == ("stop" if eos in f.tokens else "length")
    # One sequence alone stops the same way.
    alone = model.generate(PROMPT, thresholds=thresholds, max_new_tokens=24)
    assert (alone.tokens, alone.exits, alone.finish_reason) == (free[0].tokens[: k + 1], free[0].exits[: k + 1], "stop")


def test_an_end_of_sequence_inside_a_draft_stops_there(exit_is_final):
    """Every draft of this model is accepted: cycles of four tokens after the prompt's; an end of sequence
    at a cycle's second or third token must cut the cycle there, not at its end."""
    model = load(exit_is_final)
    options = dict(mode="speculative", thresholds=0.0, max_draft=4, max_new_tokens=20)
    free = model.generate(PROMPT, ignore_eos=True, **options)
    assert model.stats.cycles == {4: 4, 3: 1}  # 19 tokens after the prompt's: 4 + 4 + 4 + 4 + 3
    inside = {2, 3, 6, 7, 10, 11, 14, 15}  # neither the first nor the last token of a cycle
    k = first_new(free.tokens, lambda i: i in inside)
    eos = free.tokens[k]
    stopped = with_eos(model, eos).generate(PROMPT, **options)
    assert stopped.tokens == free.tokens[: k + 1] and stopped.finish_reason == "stop"
    assert stopped.tokens == model.generate(PROMPT, mode="full", max_new_tokens=20).tokens  # full mode stops there too


@pytest.mark.parametrize("mode", ["full", "early-exit", "speculative"])
def test_the_context_ends_a_generation_in_every_mode(llama_compiled, mode):
    """A prompt 3 positions short of the context yields 3 tokens ("length") and no error, in a batch too."""
    model = load(llama_compiled.artifact)
    context = model.manifest.model.context_length
    long = [(7 * i) % 96 for i in range(context - 3)]
    options = {"full": dict(mode="full"), "early-exit": dict(thresholds=mixed_thresholds(model, PROMPT)),
               "speculative": dict(mode="speculative", thresholds=0.0, max_draft=6)}[mode]
    near = model.generate(long, max_new_tokens=10, ignore_eos=True, **options)
    assert len(near.tokens) == 3 and near.finish_reason == "length"
    # The same tokens as a generation asked for exactly 3 (which the context does not cut).
    three = model.generate(long, max_new_tokens=3, ignore_eos=True, **options)
    assert (near.tokens, near.exits) == (three.tokens, three.exits)
    assert near.stats.context_full and not three.stats.context_full  # both "length"; the stats say which
    if mode == "speculative":  # lossless: full mode's tokens
        assert near.tokens == model.generate(long, mode="full", max_new_tokens=3, ignore_eos=True).tokens
    else:
        rows = model.generate([long, PROMPT], max_new_tokens=10, ignore_eos=True, **options)
        assert (rows[0].tokens, rows[0].exits, rows[0].finish_reason) == (near.tokens, near.exits, "length")
        assert len(rows[1].tokens) == 10 and rows[1].finish_reason == "length"


def test_the_command_line_says_when_the_context_ended_a_generation(llama_compiled):
    """`finish_reason` is "length" for max_new_tokens and for the context alike; the command line tells them apart."""
    from typer.testing import CliRunner

    from eec.cli.main import app

    context = load(llama_compiled.artifact).manifest.model.context_length
    long = ",".join(str((7 * i) % 96) for i in range(context - 3))
    said = {}
    for asked in (3, 10):
        result = CliRunner().invoke(app, ["generate", str(llama_compiled.artifact), long, "--ids",
                                          "--max-new-tokens", str(asked), "--mode", "full"])
        assert result.exit_code == 0, result.output
        assert len(result.stdout.split()) == 3  # 3 tokens either way
        said[asked] = f"stopped at the model's context ({context} positions)" in result.stderr
    assert said == {3: False, 10: True}
