"""The exit heads' in-graph scores are the numpy metrics of transformers' logits."""

import numpy as np

from eec.calib import entropy, max_probability, top2_margin
from tests.reference import hf_forward, rms_norm


def test_metrics_on_hand_computed_logits():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]))
    np.testing.assert_allclose(top2_margin(logits), [0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(max_probability(logits), [0.7, 0.4], atol=1e-12)
    np.testing.assert_allclose(entropy(logits)[1], 2 * 0.4 * np.log(0.4) + 0.2 * np.log(0.2), atol=1e-12)


def test_head_graph_confidence_equals_numpy_metric(llama_compiled):
    from eec.runtime import load

    hf, model = llama_compiled.hf, load(llama_compiled.artifact)
    sequence = [5, 17, 3, 40, 41, 9]
    out = hf_forward(hf, sequence)
    for spec in model.manifest.segments[:-1]:
        hidden = out.hidden_states[spec.exit.layer]  # [1, seq, hidden]
        token, scores, *_ = model.session(spec.exit.file).run(None, {"hidden": hidden.numpy()})
        logits = (rms_norm(hidden[0, -1], hf.model.norm.weight, hf.config.rms_norm_eps) @ hf.lm_head.weight.T)
        logits = logits.detach().numpy()
        assert int(token[0]) == int(np.argmax(logits))
        np.testing.assert_allclose(scores[0, 0], top2_margin(logits[None])[0], atol=1e-5)
        np.testing.assert_allclose(scores[0, 1], max_probability(logits[None])[0], atol=1e-5)
        np.testing.assert_allclose(scores[0, 2], entropy(logits[None])[0], atol=1e-4)
