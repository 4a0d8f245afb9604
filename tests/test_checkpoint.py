"""model.pt front-end: embedded or referenced base, trained exit heads replacing the shared ones."""

import math

import pytest
import torch

from eec.compiler import compile_model
from eec.compiler.checkpoint import Checkpoint, HeadWeights, save_checkpoint
from eec.errors import InputError
from eec.runtime import load
from tests.conftest import tiny_model
from tests.reference import hf_greedy
from tests.test_early_exit import check_tokens_against_transformers

PROMPT = [4, 9, 33, 70, 12]


def random_head(layer, hidden, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return HeadWeights(layer, "norm+linear", 1 + 0.1 * torch.randn(hidden, generator=g), torch.randn(vocab, hidden, generator=g))


@pytest.fixture(scope="module")
def checkpoint_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    hf = tiny_model("llama", seed=3, tie_word_embeddings=True)
    c = hf.config
    heads = [random_head(2, c.hidden_size, c.vocab_size, 1), random_head(4, c.hidden_size, c.vocab_size, 2)]
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ckpt = Checkpoint(base={"config": c.to_dict(), "state_dict": state}, exits=heads, tokenizer=None, metadata={})
    save_checkpoint(ckpt, root / "model.pt")
    compile_model(root / "model.pt", root / "a.eec")  # exits default to the heads' layers
    return hf, heads, root


def test_checkpoint_full_mode_matches_transformers(checkpoint_artifact):
    hf, _, root = checkpoint_artifact
    model = load(root / "a.eec")
    assert model.exits == [2, 4]
    assert model.generate(PROMPT, max_new_tokens=16, mode="full").tokens == hf_greedy(hf, PROMPT, 16)


def test_leaving_trained_heads_out_is_refused_but_no_exits_is_a_choice(checkpoint_artifact):
    hf, _, root = checkpoint_artifact
    with pytest.raises(InputError, match="trained heads at layers 4 are not among the exits"):
        compile_model(root / "model.pt", root / "some.eec", exits=[2], calibrate=False)
    compile_model(root / "model.pt", root / "none.eec", exits=[], calibrate=False)
    model = load(root / "none.eec")
    assert model.exits == [] and len(model.manifest.segments) == 1
    assert model.generate(PROMPT, max_new_tokens=8, mode="full").tokens == hf_greedy(hf, PROMPT, 8)


def test_trained_heads_give_their_own_tokens(checkpoint_artifact):
    hf, heads, root = checkpoint_artifact
    model = load(root / "a.eec")
    assert {s.exit.kind for s in model.manifest.segments[:-1]} == {"trained"}
    for thresholds in ({2: -math.inf, 4: math.inf}, {2: math.inf, 4: -math.inf}):
        result = model.generate(PROMPT, max_new_tokens=12, thresholds=thresholds)
        layer = next(k for k, v in thresholds.items() if v < 0)
        assert set(result.exits[1:]) == {layer}
        weights = {h.layer: (h.norm_weight, h.proj_weight) for h in heads}
        check_tokens_against_transformers(hf, PROMPT, result.tokens, result.exits, weights)
        # A shared head at the same layer would say something else: the trained head is really used.
        with pytest.raises(AssertionError):
            check_tokens_against_transformers(hf, PROMPT, result.tokens, result.exits)


def test_checkpoint_with_base_path(llama_compiled, tmp_path):
    base_dir = llama_compiled.artifact.parent / "llama-hf"
    ckpt = Checkpoint(base={"path": str(base_dir)}, exits=[], tokenizer=None, metadata={})
    save_checkpoint(ckpt, tmp_path / "model.pt")
    compile_model(tmp_path / "model.pt", tmp_path / "b.eec", exits=[3])
    model = load(tmp_path / "b.eec")
    assert model.generate(PROMPT, max_new_tokens=10, mode="full").tokens == hf_greedy(llama_compiled.hf, PROMPT, 10)


@pytest.mark.parametrize("field, bad, message", [
    ("norm", (32,), "shapes"), ("proj", (50, 64), "shapes"), ("layer", 6, "outside"),
])
def test_heads_that_do_not_fit_are_refused(llama_compiled, tmp_path, field, bad, message):
    c = llama_compiled.hf.config
    head = random_head(2, c.hidden_size, c.vocab_size, 0)
    if field == "norm":
        head.norm_weight = torch.ones(bad)
    elif field == "proj":
        head.proj_weight = torch.ones(bad)
    else:
        head.layer = bad
    base_dir = llama_compiled.artifact.parent / "llama-hf"
    save_checkpoint(Checkpoint({"path": str(base_dir)}, [head], None, {}), tmp_path / "model.pt")
    with pytest.raises(InputError, match=message):
        compile_model(tmp_path / "model.pt", tmp_path / "c.eec")
    assert not (tmp_path / "c.eec").exists()


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not an eec checkpoint"):
        compile_model(tmp_path / "other.pt", tmp_path / "d.eec")


def test_the_design_cards_command_works_as_written(checkpoint_artifact, tmp_path):
    """`eec compile model.pt --target jetson-orin`: no -o (the artifact lands beside model.pt), a family name
    resolved to a profile and said so; the fp16 standard-ops graphs against transformers' greedy tokens."""
    import shutil

    from typer.testing import CliRunner

    from eec.cli.main import app

    hf, _, root = checkpoint_artifact
    shutil.copy(root / "model.pt", tmp_path / "model.pt")
    result = CliRunner().invoke(app, ["compile", str(tmp_path / "model.pt"), "--target", "jetson-orin"])
    assert result.exit_code == 0, result.output
    art = tmp_path / "model-jetson-orin.eec"
    assert f"wrote {art}" in result.stderr and "recorded as jetson-orin-agx" in result.stderr
    import re  # not a terminal: plain progress lines, one per step, in order

    steps = re.findall(r"^\[\d\d:\d\d\] (.*?) \((\d+)/(\d+)\)", result.stderr, re.M)
    assert [s[0] for s in steps[:3]] == ["loading model", "exporting layers 0-2", "exporting layers 2-4"], steps
    assert "storing each weight once" in [s[0] for s in steps]
    model = load(art)
    assert (model.manifest.target, model.manifest.precision, model.exits) == ("jetson-orin-agx", "fp16", [2, 4])
    from eec.runtime.evaluate import agreement

    # fp16 flips near-ties of this wide-weight random model (token 4 of 8 here): teacher-forced agreement
    # with transformers' fp32 tokens, where a wrong graph would agree on about 1 in 96.
    assert agreement(model, PROMPT, hf_greedy(hf, PROMPT, 24)) >= 0.8
    again = CliRunner().invoke(app, ["compile", str(tmp_path / "model.pt"), "--target", "jetson-orin"])
    assert again.exit_code == 1 and "already exists" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--target", "jetson-orin", "--exits", "auto"], "name the device, e.g. --target jetson-orin-nano"),
    (["--target", "jetson-xavier"], "families: jetson-orin (jetson-orin-agx, jetson-orin-nx, jetson-orin-nano)"),
])
def test_a_family_or_unknown_target_lists_the_choices(checkpoint_artifact, tmp_path, args, message):
    from tests.test_cli_errors import run_fails

    _, _, root = checkpoint_artifact
    run_fails(["compile", root / "model.pt", "-o", tmp_path / "x.eec", *args], message)
    assert list(tmp_path.iterdir()) == []
