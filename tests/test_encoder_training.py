"""Exit training recipes for text classifiers (eec train on a *ForSequenceClassification directory), run tiny.

A learnable toy task: whether a text mentions a cat, a dog or neither. Each
recipe must lower its loss, write a model.pt that eec compiles (full mode
equal to the fine-tuned transformers model, each exit equal to its trained
head on transformers' hidden state), and keep its documented property.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eec.compiler.encoder_pipeline import compile_encoder
from eec.runtime import load
from eec.train.encoder import ClassifierTrainConfig, train_classifier
from tests.test_encoders import CORPUS, tiny_classifier, tokenizer

LABELS = ("cat", "dog", "neither")


def toy_texts(n: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    words = [w for w in " ".join(CORPUS).split() if w not in ("cat", "dog")]
    rows = []
    for _ in range(n):
        label = LABELS[rng.integers(0, 3)]
        text = list(rng.choice(words, rng.integers(3, 10)))
        if label != "neither":
            text.insert(int(rng.integers(0, len(text))), label)
        rows.append((" ".join(text), label))
    return rows


def make_toy(root, family: str, texts: int):
    """A tiny ``family`` classifier with narrow initial weights in ``root / "hf"`` and ``texts`` labelled toy
    texts in ``root / "train.jsonl"``."""
    tok = tokenizer("bert")
    model = tiny_classifier(family, len(tok), tok.pad_token_id, init=0.02)
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {name: i for i, name in enumerate(LABELS)}
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    with open(root / "train.jsonl", "w") as f:
        for text, label in toy_texts(texts, 0):
            f.write(json.dumps({"text": text, "label": label}) + "\n")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy(root, "bert", 240)
    with open(root / "unlabeled.jsonl", "w") as f:
        for text, _ in toy_texts(240, 1):
            f.write(json.dumps({"text": text}) + "\n")
    return root


def compiled_matches_transformers(checkpoint, out, texts):
    """The artifact's full mode is the fine-tuned model's, and each exit is its trained head on transformers'
    hidden state of that layer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from eec.train.encoder import ExitHead

    raw = torch.load(checkpoint, weights_only=True)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**raw["base"]["config"]))
    model.load_state_dict(raw["base"]["state_dict"])
    model.eval()
    compile_encoder(checkpoint, out, data=checkpoint.parent / "train.jsonl")
    clf = load(out)
    assert clf.exits == [e["layer"] for e in raw["exits"]]
    tok = AutoTokenizer.from_pretrained(checkpoint.parent / "hf")
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True)
    np.testing.assert_allclose(clf.classify(texts, mode="full").probs, torch.softmax(ref.logits, -1).numpy(), atol=2e-5)
    first = raw["exits"][0]
    head = ExitHead(32, 3)
    head.load_state_dict(first["state_dict"])
    with torch.no_grad():
        want = torch.softmax(head(ref.hidden_states[first["layer"]]), -1).numpy()
    got = clf.classify(texts, thresholds=-np.inf)
    assert (got.exits == first["layer"]).all()
    np.testing.assert_allclose(got.probs, want, atol=2e-5)
    return raw


def learned_exit_decides(raw, art, texts, toy):
    """BERxiT's module runs in the segment: metric "learned" leaves at the first exit whose module score, computed
    here by hand from transformers' hidden states, reaches the threshold."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from eec.train.encoder import LearnedExit

    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**raw["base"]["config"]))
    model.load_state_dict(raw["base"]["state_dict"])
    model.eval()
    module = LearnedExit(32)
    module.load_state_dict(raw["learned_exit"]["state_dict"])
    batch = AutoTokenizer.from_pretrained(toy / "hf")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
        scores = {k: module(states[k]).numpy() for k in (1, 2)}
    clf = load(art)
    assert clf.manifest.learned_exit
    tau = float(np.median(np.concatenate(list(scores.values()))))
    want = [next((k for k in (1, 2) if scores[k][i] >= tau), 4) for i in range(len(texts))]
    assert len(set(want)) > 1
    got = clf.classify(texts, thresholds=tau, metric="learned")
    assert got.exits.tolist() == want
    assert len(clf.thresholds_for(0.5, "learned", rule="valade")) == 2  # calibrated on its own scores


@pytest.mark.parametrize("recipe", ["deebert", "pabee", "fastbert", "berxit"])
def test_recipe_learns_and_compiles(toy, recipe, monkeypatch):
    from eec.train import encoder

    snapshots = {}
    original = encoder._Trainer.stage

    def spy(self, name, *args, **kwargs):  # the backbone as each stage starts
        snapshots[name] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(encoder._Trainer, "stage", spy)
    out = toy / f"{recipe}.pt"
    # 10 epochs: in 4 the loss moved by a percent and every exit answered the majority class (0.46)
    config = ClassifierTrainConfig(recipe=recipe, exits=[1, 2], epochs=10, lr=1e-3, head_lr=3e-3)
    result = train_classifier(toy / "hf", toy / "train.jsonl", out, config)
    for stage, losses in result.losses.items():
        assert losses[-1] < 0.8 * losses[0], (stage, losses)
    # the exits learned the task: their held-out accuracy beats the majority class and the model's own
    # classifier reused there
    assert all(result.accuracy_after[k] > max(0.6, result.accuracy_before[k]) for k in (1, 2)), result
    raw = compiled_matches_transformers(out, toy / f"{recipe}.eec", [t for t, _ in toy_texts(7, 5)])
    if recipe == "berxit":
        learned_exit_decides(raw, toy / f"{recipe}.eec", [t for t, _ in toy_texts(9, 8)], toy)
    if recipe == "deebert":  # stage two trains the exits alone: the backbone is stage one's, exactly
        frozen = snapshots["training the exits (backbone frozen)"]
        assert all(torch.equal(raw["base"]["state_dict"][k], v) for k, v in frozen.items())


@pytest.mark.parametrize("family", ["electra", "albert"])
def test_electra_and_albert_checkpoints_train_and_compile(tmp_path, family):
    """ELECTRA and ALBERT (embeddings narrower than their layers, projected up; ALBERT's layers share one
    layer's weights): a recipe's checkpoint compiles to the fine-tuned model's logits, and its first exit is
    its trained head on transformers' hidden state."""
    make_toy(tmp_path, family, 120)
    config = ClassifierTrainConfig(recipe="pabee", exits=[1, 2], epochs=2, lr=1e-3, head_lr=3e-3)
    result = train_classifier(tmp_path / "hf", tmp_path / "train.jsonl", tmp_path / "electra.pt", config)
    assert all(losses[-1] < losses[0] for losses in result.losses.values()), result.losses
    raw = compiled_matches_transformers(tmp_path / "electra.pt", tmp_path / "electra.eec", [t for t, _ in toy_texts(7, 5)])
    assert raw["base"]["config"]["model_type"] == family


def test_fastbert_trains_exits_without_labels(toy):
    out = toy / "fastbert-unlabeled.pt"
    config = ClassifierTrainConfig(recipe="fastbert", exits=[1, 2], epochs=4, head_lr=3e-3)
    result = train_classifier(toy / "hf", toy / "unlabeled.jsonl", out, config)
    (stage, losses), = result.losses.items()  # one stage: self-distillation; nothing to fine-tune on
    assert "self-distilling" in stage and losses[-1] < losses[0]
    raw = torch.load(out, weights_only=True)
    from transformers import AutoModelForSequenceClassification

    original = AutoModelForSequenceClassification.from_pretrained(toy / "hf").state_dict()
    assert all(torch.equal(raw["base"]["state_dict"][k], v) for k, v in original.items())  # the teacher unchanged
    compiled_matches_transformers(out, toy / "fastbert-unlabeled.eec", [t for t, _ in toy_texts(5, 6)])


def test_recipes_refuse_bad_input(toy, tmp_path):
    from tests.test_cli_errors import run_fails

    run_fails(["train", toy / "hf", "--exits", "1", "-o", tmp_path / "m.pt", "--data", toy / "unlabeled.jsonl",
               "--recipe", "pabee"], "pabee trains on labels")
    run_fails(["train", toy / "hf", "--exits", "4", "-o", tmp_path / "m.pt", "--data", toy / "train.jsonl"],
              "exits sit after 1..3 layers")
    run_fails(["train", toy / "hf", "--exits", "1", "-o", tmp_path / "m.pt", "--data", toy / "train.jsonl",
               "--recipe", "magic"], "unknown recipe 'magic'")
    assert list(tmp_path.iterdir()) == []
