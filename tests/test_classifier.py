"""Exit classifiers: fused into the segment graph, gating the head, calibrated on unseen sequences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eec.calib.traces import Traces
from eec.compiler import compile_model
from eec.compiler.export import export_segment, segment_inputs
from eec.compiler.frontends import load_source
from eec.compiler.modules import ExitClassifier
from eec.compiler.segments import plan_segments
from eec.runtime import load
from eec.runtime.sessions import open_sessions

PROMPT = [3, 17, 42, 8, 91, 5]


def test_fused_score_equals_the_pytorch_classifier(llama_src, tmp_path):
    torch.manual_seed(0)
    classifier = ExitClassifier(64).eval()
    plan = plan_segments(load_source(llama_src / "hf"), [2], contrib_ops=True, context=128, classifiers={2: classifier})
    seg = plan.segments[0]
    assert seg.spec.outputs[:2] == ["hidden_out", "exit_score"]
    export_segment(seg, tmp_path)
    session = open_sessions(tmp_path, [seg.spec.file])[0]
    args = segment_inputs(seg, batch=1, seq=3, past=4, seed=5)
    hidden, score = session.run(["hidden_out", "exit_score"], {n: a.numpy() for n, a in zip(seg.spec.inputs, args)})
    with torch.no_grad():
        expected = classifier(torch.from_numpy(hidden[:, -1, :]))
    np.testing.assert_allclose(score, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert 0 < float(score[0]) < 1


@pytest.fixture(scope="module")
def classified(llama_src):
    """The artifact, its manifest, and what each traced run and the classifiers' training saw."""
    import eec.calib.calibrate as calibrate
    import eec.compiler.pipeline as pipeline

    seen = {"calibration": [], "classifier": [], "trained_on": []}

    def recording(where, collect):
        def run(model, prompts, *args, **kwargs):
            traces = collect(model, prompts, *args, **kwargs)
            seen[where].append(([tuple(p) for p in prompts], traces))
            return traces
        return run

    train = pipeline.train_classifiers
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibrate, "collect_traces", recording("calibration", calibrate.collect_traces))
        mp.setattr(pipeline, "collect_traces", recording("classifier", pipeline.collect_traces))
        mp.setattr(pipeline, "train_classifiers", lambda traces, *a, **k: (seen["trained_on"].append(traces),
                                                                            train(traces, *a, **k))[1])
        out = llama_src / "clf.eec"
        manifest = compile_model(llama_src / "hf", out, exits=[2, 4], exit_classifier=True, calibration_tokens=16)
    return out, manifest, seen


def test_classifier_artifact_is_calibrated_on_its_own_scores(classified):
    out, manifest, seen = classified
    assert manifest.calibration.metric == "classifier"
    assert [s.scores_exit for s in manifest.segments] == [True, True, False]
    traces = Traces.load(out / manifest.calibration.file)
    scores = traces.scores[:, :, 4]
    assert not np.isnan(scores).any() and ((0 <= scores) & (scores <= 1)).all() and scores.std() > 0
    # The classifiers learn from traces of one prompt set and are calibrated on another: no
    # calibration prompt (whose agreement the thresholds are fitted to) was in their training data.
    (trained_prompts, trained_traces), = seen["classifier"]
    assert seen["trained_on"] and all(t is trained_traces for t in seen["trained_on"])
    calibration_prompts = {p for prompts, _ in seen["calibration"] for p in prompts}
    assert calibration_prompts and not calibration_prompts & set(trained_prompts)
    assert len(np.unique(traces.sequence)) == len(seen["calibration"][-1][0])  # the stored traces: every one


class Counting:
    """A head session that counts its runs (the decoder runs heads through IO binding)."""

    def __init__(self, session):
        self.session, self.calls = session, 0

    def get_outputs(self):
        return self.session.get_outputs()

    def io_binding(self):
        return self.session.io_binding()

    def run_with_iobinding(self, binding):
        self.calls += 1
        return self.session.run_with_iobinding(binding)


def test_head_runs_only_for_tokens_that_leave_and_gives_the_heads_token(classified):
    out, _, _ = classified
    model = load(out)
    heads = {s.exit.file for s in model.manifest.segments if s.exit and s.exit.file}
    model.opened = {f: Counting(s) if f in heads else s for f, s in model.opened.items()}
    stay = model.generate(PROMPT, max_new_tokens=12, thresholds=math.inf, metric="classifier")
    assert sum(model.opened[f].calls for f in heads) == 0  # the classifier said stay: no projection ran
    assert stay.exits == [6] * 12
    leave = model.generate(PROMPT, max_new_tokens=12, thresholds=-math.inf, metric="classifier")
    assert sum(model.opened[f].calls for f in heads) == 11  # one head per token after the prompt
    by_head = model.generate(PROMPT, max_new_tokens=12, thresholds=-math.inf, metric="top2-margin")
    assert leave.tokens == by_head.tokens and leave.exits == by_head.exits == [6] + [2] * 11
    eps = model.generate(PROMPT, max_new_tokens=12, epsilon=0.8)  # the artifact's default metric: classifier
    fixed = model.generate(PROMPT, max_new_tokens=12, thresholds=model.thresholds_for(0.8, "classifier"),
                           metric="classifier")
    assert (eps.tokens, eps.exits) == (fixed.tokens, fixed.exits)
    # Whichever exit each token left at, it is that head's token on transformers' hidden state.
    from transformers import AutoModelForCausalLM
    from tests.test_early_exit import check_tokens_against_transformers

    hf = AutoModelForCausalLM.from_pretrained(out.parent / "hf").eval()
    for run in (eps, leave, stay):
        check_tokens_against_transformers(hf, PROMPT, run.tokens, run.exits)
