"""Calibration traces come from the compiled artifact and agree with transformers;
ε-thresholds at run time are the cascade rule applied to the stored traces."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from eec.calib.calibrate import default_prompts
from eec.calib.metrics import cosine, top2_margin
from eec.calib.thresholds import cascade_thresholds, valade_threshold
from eec.cli.main import app
from eec.errors import InputError
from eec.runtime import load
from tests.reference import hf_forward, hf_greedy, rms_norm
from tests.test_cli_errors import run_fails


def test_traces_match_transformers(llama_compiled):
    hf, model = llama_compiled.hf, load(llama_compiled.artifact)
    traces = model.traces
    assert traces.exits == model.exits == [1, 3, 4]
    prompt = default_prompts(False, hf.config.vocab_size)[0]
    rows = np.flatnonzero(traces.sequence == 0)
    generated = hf_greedy(hf, prompt, len(rows) + 1)
    out = hf_forward(hf, prompt + generated)
    norm_w, proj_w, eps = hf.model.norm.weight, hf.lm_head.weight, hf.config.rms_norm_eps
    for r, row in enumerate(rows):
        pos = len(prompt) + r  # row r predicts generated[r + 1] from this position
        for k, layer in enumerate(traces.exits):
            h = out.hidden_states[layer][0, pos]
            logits = (rms_norm(h, norm_w, eps) @ proj_w.T).detach().numpy()
            assert traces.agreed[row, k] == (int(np.argmax(logits)) == generated[r + 1])
            np.testing.assert_allclose(traces.scores[row, k, 0], top2_margin(logits), atol=1e-5)
            if k == 0:
                assert np.isnan(traces.scores[row, k, 3])
            else:
                prev = out.hidden_states[traces.exits[k - 1]][0, pos].detach().numpy()
                np.testing.assert_allclose(traces.scores[row, k, 3], cosine(h.detach().numpy(), prev), atol=1e-5)


def test_epsilon_thresholds_are_the_cascade_rule_on_stored_traces(llama_compiled):
    model = load(llama_compiled.artifact)
    with np.load(llama_compiled.artifact / "calibration.npz") as z:
        scores, agreed = z["scores"][:, :, 0], z["agreed"]
    for eps in (0.5, 0.8, 0.95):
        want = cascade_thresholds(scores, agreed, eps, valade_threshold)
        got = model.thresholds_for(eps, metric="top2-margin", rule="valade")
        assert list(got.values()) == want
    prompt = [9, 8, 7, 6]
    taus = model.thresholds_for(0.5, metric="top2-margin", rule="valade")
    by_eps = model.generate(prompt, max_new_tokens=16, epsilon=0.5, metric="top2-margin", rule="valade")
    by_tau = model.generate(prompt, max_new_tokens=16, thresholds=taus, metric="top2-margin")
    assert by_eps.tokens == by_tau.tokens and by_eps.exits == by_tau.exits


def test_epsilon_one_and_zero(llama_compiled):
    model = load(llama_compiled.artifact)
    prompt = [3, 1, 4, 1, 5]
    n = model.num_layers
    assert set(model.generate(prompt, max_new_tokens=10, epsilon=1.0).exits) == {n}  # risk rule never certifies 1
    at_zero = model.generate(prompt, max_new_tokens=10, epsilon=0.0, rule="valade", metric="top2-margin")
    assert set(at_zero.exits[1:]) == {model.exits[0]}  # ε = 0: everything leaves at the first exit


@pytest.fixture
def uncalibrated(llama_compiled, tmp_path):
    from eec.compiler import compile_model

    out = tmp_path / "plain.eec"
    compile_model(llama_compiled.artifact.parent / "llama-hf", out, exits=[2, 4], calibrate=False)
    return out


def test_uncalibrated_artifact_asks_for_calibration(uncalibrated):
    model = load(uncalibrated)
    assert model.manifest.calibration is None
    with pytest.raises(InputError, match="eec calibrate"):
        model.generate([1, 2], max_new_tokens=2, epsilon=0.9)
    with pytest.raises(InputError, match="eec calibrate"):
        model.thresholds_for(0.9)
    run_fails(["generate", uncalibrated, "1,2", "--ids", "--eps", "0.9"], "eec calibrate")


@pytest.mark.parametrize("eps", ["1.5", "-0.2", "nan"])
def test_epsilon_outside_unit_interval(llama_compiled, eps):
    run_fails(["generate", llama_compiled.artifact, "1,2", "--ids", "--eps", eps], "epsilon must be in [0, 1]")


def test_calibrate_command(uncalibrated, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    before = (uncalibrated / "manifest.json").read_text()
    run_fails(["calibrate", uncalibrated, "--prompts", empty], "no prompts")
    run_fails(["calibrate", uncalibrated, "--metric", "vibes"], "unknown metric")
    assert (uncalibrated / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "plain.eec"]

    prompts = tmp_path / "ids.txt"
    prompts.write_text("1,2,3\n40,41\n7\n")
    result = CliRunner().invoke(app, ["calibrate", str(uncalibrated), "--prompts", str(prompts), "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    model = load(uncalibrated)  # hashes verified
    assert model.manifest.calibration.prompts == 3 and model.manifest.calibration.tokens == 3 * 11
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "ids.txt", "plain.eec"]
    # Calibrating again replaces the traces; the artifact stays valid.
    prompts.write_text("5,6\n")
    assert CliRunner().invoke(app, ["calibrate", str(uncalibrated), "--prompts", str(prompts)]).exit_code == 0
    assert load(uncalibrated).manifest.calibration.prompts == 1


def test_compile_refuses_empty_prompts_before_working(llama_compiled, tmp_path):
    empty = tmp_path / "p.txt"
    empty.write_text("")
    run_fails(["compile", llama_compiled.artifact.parent / "llama-hf", "-o", tmp_path / "x.eec", "--prompts", empty],
              "no prompts")
    assert not (tmp_path / "x.eec").exists()


def test_tampered_calibration_is_refused(llama_compiled, tmp_path):
    copy = tmp_path / "c.eec"
    shutil.copytree(llama_compiled.artifact, copy)
    with open(copy / "calibration.npz", "ab") as f:
        f.write(b"\0")
    run_fails(["generate", copy, "1,2", "--ids", "--eps", "0.9"], "sha256")


def test_inspect_shows_what_each_epsilon_does_on_the_calibration_tokens(llama_compiled, tmp_path):
    """`eec inspect` on a calibrated decoder: per ε, τ at each exit, the share of calibration tokens leaving at
    each exit and their agreement, held to a cascade replayed token by token here."""
    import hashlib
    import json

    from eec.calib.metrics import ALL_METRICS
    from eec.calib.traces import Traces, thresholds_for
    from eec.cli.main import INSPECT_EPS

    art = tmp_path / "a.eec"
    shutil.copytree(llama_compiled.artifact, art)
    raw = json.loads((art / "manifest.json").read_text())
    cal, n_layers = raw["calibration"], raw["model"]["num_layers"]
    exits = llama_compiled.exits
    rng = np.random.default_rng(0)  # scores that rise with depth; an exit agrees more often where it is confident
    scores = np.full((600, len(exits), len(ALL_METRICS)), np.nan, np.float32)
    margin = np.clip(rng.random((600, len(exits))) + np.arange(len(exits)) * 0.15, 0, 1)
    scores[:, :, ALL_METRICS.index(cal["metric"])] = margin
    agreed = rng.random((600, len(exits))) < 0.6 + 0.4 * margin
    Traces(list(exits), scores, agreed, np.arange(600) // 20).save(art / cal["file"])
    raw["files"][cal["file"]] = hashlib.sha256((art / cal["file"]).read_bytes()).hexdigest()
    (art / "manifest.json").write_text(json.dumps(raw))

    shown = CliRunner().invoke(app, ["inspect", str(art)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in shown.stdout.splitlines() if line.startswith("│") and line.split("│")[1].strip() in
            {str(e) for e in INSPECT_EPS}}
    traces = Traces.load(art / cal["file"])
    stored = traces.scores[:, :, ALL_METRICS.index(cal["metric"])]  # float32, as written
    left = set()
    for eps in INSPECT_EPS:
        taus = thresholds_for(traces, eps, cal["metric"])
        leaving, agree, depth = [0] * len(exits), 0, []
        for t in range(600):  # the first exit whose score reaches its τ takes the token
            k = next((k for k in range(len(exits)) if stored[t, k] >= taus[exits[k]]), None)
            if k is not None:
                leaving[k] += 1
            agree += bool(agreed[t, k]) if k is not None else 1
            depth.append(n_layers if k is None else exits[k])
        want = [*(f"{taus[e]:.3f}" for e in exits), ", ".join(f"{c / 600:.0%}" for c in leaving),
                f"{np.mean(depth):.1f} of {n_layers}", f"{agree / 600:.3f}"]
        assert rows[str(eps)] == want, (eps, rows[str(eps)], want)
        left.add(sum(leaving))
    assert len(left) > 1 and max(left) > 0  # the levels differ: a table that ignored ε would fail
