"""BERT-family text classifiers: eec compile on a Hugging Face directory -> classify(texts), against transformers.

Tiny random BERT, RoBERTa, DistilBERT, ELECTRA and ALBERT models with real tokenizers (a
WordPiece and a byte-level BPE trained here); references are transformers'
own forward passes on its own tokenizer's padded batches, and, for the exits,
the model's own classifier on transformers' hidden states of that layer.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from eec.compiler.encoder_pipeline import compile_encoder
from eec.errors import InputError, UnsupportedModelError
from eec.runtime import load
from tests.test_branched import middle_cut

CORPUS = ("the cat sat on the mat and looked at the dog . a dog ran after the ball in the park while "
          "children played near the old tree . functions return values ; classes hold state and methods . "
          "import os and sys , then read the file line by line until the end").split(" . ")
TEXTS = ["the cat sat", "a dog ran after the ball in the park while children played near the old tree",
         "functions return values", "import os", "classes hold state and methods ; the dog looked at the cat",
         "read the file line by line until the end of the park", "the", "children played near the mat",
         "a cat and a dog and a ball and a tree and a park and a file"]
LAYERS = 4
POSITIONS = 24  # the longest input, special tokens included


def tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "roberta":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    # The vocabulary written out rather than trained: tokenizers' WordPiece trainer orders a vocabulary of tied
    # counts differently from run to run, and the random model's answers (and so what exits do) with it.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted(set(" ".join(CORPUS).split()))
    chars = sorted(set("".join(words)))
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + chars + [f"##{c}" for c in chars] + words))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_classifier(family: str, vocab: int, pad: int, labels: int = 3, positions: int = POSITIONS,
                    init: float = 0.4):
    from transformers import (AlbertConfig, AlbertForSequenceClassification, BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, ElectraConfig, ElectraForSequenceClassification,
                              RobertaConfig, RobertaForSequenceClassification)

    torch.manual_seed(0)
    # wide initial weights (0.4) make random exits confident and disagree; training starts from narrow ones
    common = dict(vocab_size=vocab, num_labels=labels, pad_token_id=pad, initializer_range=init,
                  id2label={i: f"class{i}" for i in range(labels)}, label2id={f"class{i}": i for i in range(labels)})
    if family == "bert":
        config = BertConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=positions, **common)
        return BertForSequenceClassification(config).eval()
    if family == "roberta":
        config = RobertaConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=positions + pad + 1, **common)
        return RobertaForSequenceClassification(config).eval()
    if family == "albert":  # one layer's weights shared by all, embeddings projected up
        config = AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=positions, **common)
        return AlbertForSequenceClassification(config).eval()
    if family == "electra":
        # embeddings narrower than the layers, as in ELECTRA's small models: its projection up is exercised
        config = ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=positions, **common)
        return ElectraForSequenceClassification(config).eval()
    config = DistilBertConfig(dim=32, n_layers=LAYERS, n_heads=4, hidden_dim=64, max_position_embeddings=positions,
                              **common)
    return DistilBertForSequenceClassification(config).eval()


FAMILIES = ("bert", "roberta", "distilbert", "electra", "albert")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Each family saved as a Hugging Face directory and compiled with exits after 1 and 2 layers, calibrated."""
    root = tmp_path_factory.mktemp("encoders")
    made = {}
    for family in FAMILIES:
        tok = tokenizer(family)
        model = tiny_classifier(family, len(tok), tok.pad_token_id)
        model.save_pretrained(root / family)
        tok.save_pretrained(root / family)
        data = root / f"{family}.jsonl"
        rng = np.random.default_rng(0)
        words = " ".join(CORPUS).split()
        with open(data, "w") as f:
            for _ in range(120):
                f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(1, 14))),
                                    "label": f"class{rng.integers(0, 3)}"}) + "\n")
        compile_encoder(root / family, root / f"{family}.eec", exits=[1, 2], data=data)
        made[family] = (model, tok, root / f"{family}.eec")
    return made


def reference(model, tok, texts: list[str]) -> dict[int, np.ndarray]:
    """Probabilities at every layer from transformers on its own padded batch: the model's classifier on that
    layer's hidden state (the last layer's is the model's logits)."""
    batch = tok(texts, padding=True, truncation=True, max_length=POSITIONS, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        probs = {LAYERS: torch.softmax(out.logits.double(), -1).numpy()}
        family = model.config.model_type
        for k in range(1, LAYERS):
            h = out.hidden_states[k]
            if family == "bert":
                logits = model.classifier(model.bert.pooler(h))
            elif family == "albert":
                logits = model.classifier(model.albert.pooler_activation(model.albert.pooler(h[:, 0])))
            elif family in ("roberta", "electra"):
                logits = model.classifier(h)
            else:
                logits = model.classifier(torch.relu(model.pre_classifier(h[:, 0])))
            probs[k] = torch.softmax(logits.double(), -1).numpy()
    return probs


@pytest.mark.parametrize("family", FAMILIES)
def test_full_mode_equals_transformers_on_padded_batches(encoders, family):
    model, tok, art = encoders[family]
    clf = load(art)
    want = reference(model, tok, TEXTS)[LAYERS]
    for batch_size in (1, 4, 9):
        got = clf.classify(TEXTS, mode="full", batch_size=batch_size)
        np.testing.assert_allclose(got.probs, want, rtol=0, atol=2e-5)
        assert got.labels.tolist() == want.argmax(-1).tolist()
        assert (got.exits == LAYERS).all()
    assert clf.manifest.class_names == ["class0", "class1", "class2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_early_exit_matches_transformers_and_each_text_alone(encoders, family):
    model, tok, art = encoders[family]
    clf = load(art)
    ref = reference(model, tok, TEXTS)
    taus = [middle_cut(ref[k].max(-1)) for k in (1, 2)]
    want_exits = np.full(len(TEXTS), LAYERS)
    want_labels = ref[LAYERS].argmax(-1)
    for i in range(len(TEXTS)):  # by hand: the first exit whose top probability reaches its threshold
        for k, tau in zip((1, 2), taus):
            if ref[k][i].max() >= tau:
                want_exits[i], want_labels[i] = k, ref[k][i].argmax()
                break
    assert len(set(want_exits.tolist())) > 1
    got = clf.classify(TEXTS, thresholds=taus, metric="max-prob", batch_size=9)
    assert got.exits.tolist() == want_exits.tolist()
    assert got.labels.tolist() == want_labels.tolist()
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(got.probs[i], ref[int(got.exits[i])][i], rtol=0, atol=2e-5)
        alone = clf.classify(text, thresholds=taus, metric="max-prob")
        assert (alone.labels[0], alone.exits[0]) == (got.labels[i], got.exits[i])
    never = clf.classify(TEXTS, thresholds=math.inf)
    np.testing.assert_allclose(never.probs, ref[LAYERS], atol=2e-5)
    first = clf.classify(TEXTS, thresholds=-math.inf)
    assert (first.exits == 1).all() and first.labels.tolist() == ref[1].argmax(-1).tolist()


def test_long_texts_are_truncated_and_said_so(encoders):
    model, tok, art = encoders["bert"]
    clf = load(art)
    long = " ".join(["the cat sat on the mat"] * 20)
    got = clf.classify([long, "the cat"], mode="full")
    assert got.truncated.tolist() == [True, False]
    want = reference(model, tok, [long, "the cat"])[LAYERS]  # transformers' tokenizer truncates at the same length
    np.testing.assert_allclose(got.probs, want, atol=2e-5)


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_each_weight_is_stored_once(encoders, family):
    """Exit segments' graphs with heads repeat their segment, every exit reusing the model's classifier repeats
    it, and ALBERT's layers are one layer: the artifact stores the model's parameters about once (transformers'
    own count), every graph reading one weights file, and no graph holds a large weight inline."""
    model, _, art = encoders[family]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    graphs = art / "graphs"
    stored = (graphs / "weights.data").stat().st_size
    assert 0.9 * params <= stored <= 1.02 * params, (stored, params)
    assert all(f.stat().st_size < 64 << 10 for f in graphs.glob("*.onnx"))
    assert sorted(f.name for f in graphs.iterdir() if not f.name.endswith(".onnx")) == ["weights.data"]


def test_length_buckets_are_the_cheapest_cut(encoders):
    """Against every way of cutting sorted lengths into runs, priced by hand: padded positions plus a call each."""
    import itertools

    from eec.runtime.classifier import length_buckets

    rng = np.random.default_rng(1)
    for _ in range(60):
        n, most, call = int(rng.integers(1, 9)), int(rng.integers(1, 5)), int(rng.integers(0, 40))
        lengths = sorted(rng.integers(1, 60, n).tolist())

        def price(runs):
            return sum(call + (b - a) * lengths[b - 1] for a, b in runs)

        best = math.inf
        for cuts in itertools.product((0, 1), repeat=n - 1):  # a cut after text i or not
            edges = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
            runs = list(zip(edges, edges[1:]))
            if all(b - a <= most for a, b in runs):
                best = min(best, price(runs))
        got = length_buckets(lengths, most, call)
        assert got[0][0] == 0 and got[-1][1] == n and all(a < b for a, b in got)
        assert all(b == c for (_, b), (c, _) in zip(got, got[1:])) and all(b - a <= most for a, b in got)
        assert price(got) == best


def test_texts_of_very_different_lengths_run_in_separate_batches(encoders):
    """A list of short texts and long ones runs as a batch of each (not the short ones padded to the long ones'
    length), and every text gets what it gets alone and what transformers gives it."""
    model, tok, art = encoders["bert"]
    clf = load(art)
    texts = ["the cat", "a dog", "the mat", "import os"] * 10 + [" ".join(["the cat sat on the mat"] * 4)] * 6
    got = clf.classify(texts, mode="full", batch_size=64)
    widths = [main.shape[1] for _, main, _ in clf.text.batches(texts, 64)[0]]
    assert len(widths) == 2 and widths[0] < 8 and widths[1] == POSITIONS
    assert got.stats.segment_samples[0] == 40  # the short texts' batch ran first
    want = reference(model, tok, texts)[LAYERS]
    np.testing.assert_allclose(got.probs, want, rtol=0, atol=2e-5)
    for i in (0, 45):
        np.testing.assert_allclose(clf.classify(texts[i], mode="full").probs[0], got.probs[i], rtol=0, atol=1e-6)


def test_calibration_reads_labels_by_name(encoders):
    _, _, art = encoders["distilbert"]
    clf = load(art)
    cal = clf.manifest.calibration
    assert cal.samples == 120 and cal.labeled
    _, labels = clf.calibration()
    assert set(labels.tolist()) <= {0, 1, 2}
    taus = clf.thresholds_for(0.5, "max-prob", rule="valade")
    assert len(taus) == 2


def test_accuracy_criterion_is_fitted_against_the_labels(tmp_path, encoders):
    """ε as accuracy (a labeled calibration set): an exit may take a sample unless its answer is wrong where the
    final classifier's is right. Reference: transformers' probabilities on the calibration texts and their
    labels, each exit's Valade threshold found by trying every candidate, in cascade order."""
    from eec.calib.classifier_calibration import calibrate_classifier

    model, tok, art = encoders["distilbert"]
    rows = [json.loads(line) for line in open(art.parent / "distilbert.jsonl")]
    texts, labels = [r["text"] for r in rows], np.array([int(r["label"][-1]) for r in rows])
    ref = reference(model, tok, texts)
    conf = np.stack([ref[k].max(-1) for k in (1, 2)], 1)
    answers = np.stack([ref[k].argmax(-1) for k in (1, 2)], 1)
    final = ref[LAYERS].argmax(-1)

    def by_hand(ok: np.ndarray, eps: float) -> list[float]:
        remaining, taus = np.ones(len(texts), bool), []
        for k in range(2):
            c, t = conf[remaining, k], ok[remaining, k]
            taus.append(min((v for v in np.unique(c) if t[c >= v].mean() >= eps), default=math.inf))
            remaining &= ~(conf[:, k] >= taus[-1])
        return taus

    clf = load(art)
    eps = 0.8
    lost = (answers != labels[:, None]) & (final == labels)[:, None]
    want = by_hand(~lost, eps)
    agreement = by_hand(answers == final[:, None], eps)
    assert want != agreement  # the labels change what leaves: the test tells the criteria apart
    got = clf.thresholds_for(eps, "max-prob", rule="valade", criterion="accuracy")
    assert got == pytest.approx(want, abs=1e-5)
    assert clf.thresholds_for(eps, "max-prob", rule="valade", criterion="agreement") == pytest.approx(agreement, abs=1e-5)
    out = clf.classify(texts, epsilon=eps, metric="max-prob", rule="valade", criterion="accuracy")
    full = clf.classify(texts, mode="full")
    left = out.exits < LAYERS
    assert left.any()
    # on the set it was fitted on, Valade's rule holds exactly: early exit loses at most 1 - ε of the right answers
    assert (~((out.labels != labels) & (full.labels == labels)))[left].mean() >= eps  # as the rule counts it
    assert (out.labels == labels).mean() >= (full.labels == labels).mean() - (1 - eps)

    # rule "joint": one λ for both exits, certified on all 120 samples (the walk in test_thresholds as reference)
    from tests.test_thresholds import _joint_by_hand

    lam = _joint_by_hand(conf, ~lost, 0.7, 0.1)
    assert np.isfinite(lam) and lam != _joint_by_hand(conf, answers == final[:, None], 0.7, 0.1)
    assert clf.thresholds_for(0.7, "max-prob", rule="joint", criterion="accuracy") == pytest.approx([lam, lam], abs=1e-5)
    # compiled on labeled texts without --criterion or --rule: that is what ε means by default
    assert (clf.manifest.calibration.criterion, clf.manifest.calibration.rule) == ("accuracy", "joint")
    assert clf.thresholds_for(0.7, "max-prob") == pytest.approx([lam, lam], abs=1e-5)

    with pytest.raises(InputError, match="unknown criterion 'labels'"):
        clf.classify(texts[:2], epsilon=eps, criterion="labels")
    with pytest.raises(InputError, match="thresholds given by hand"):
        clf.classify(texts[:2], thresholds=[0.5, 0.5], criterion="accuracy")
    copy = tmp_path / "unlabeled.eec"
    shutil.copytree(art, copy)
    with pytest.raises(InputError, match="ε is accuracy against labels"):  # compiled on labeled texts
        calibrate_classifier(copy, texts, None)
    calibrate_classifier(copy, texts, None, criterion="agreement")
    cal = load(copy).manifest.calibration
    assert (cal.criterion, cal.rule, cal.labeled) == ("agreement", "joint", False)  # the rule kept
    with pytest.raises(InputError, match="needs a labeled calibration set"):
        load(copy).classify(texts[:2], epsilon=eps, criterion="accuracy")


def test_a_manifest_with_an_unknown_meaning_of_epsilon_is_refused(tmp_path, encoders):
    from eec.errors import ArtifactError

    _, _, art = encoders["distilbert"]
    for field, value, message in [("criterion", "labels", "criterion must be one of"),
                                  ("rule", "best", "rule one of"), ("labeled", False, "accuracy only with labels")]:
        copy = tmp_path / f"{field}.eec"
        shutil.copytree(art, copy)
        raw = json.loads((copy / "manifest.json").read_text())
        raw["calibration"].update({"criterion": "accuracy"} if field == "labeled" else {}, **{field: value})
        (copy / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(ArtifactError, match=message):
            load(copy)


def test_bad_text_inputs(encoders):
    _, _, art = encoders["roberta"]
    clf = load(art)
    for bad, message in [([], "no texts"), (["fine", "  "], "text 1 is empty"), ([b"bytes"], "not text"),
                         (np.zeros((2, 3), np.int64), "takes a text or a list of texts")]:
        with pytest.raises(InputError, match=message):
            clf.classify(bad)
    with pytest.raises(InputError, match="batch_size"):
        clf.classify(["a"], batch_size=0)


@pytest.mark.parametrize("criterion, rule, eps", [("agreement", "risk", 0.8), ("accuracy", "joint", 0.9)])
def test_exits_auto_keeps_the_cheapest_set_on_hand_prices(tmp_path, encoders, monkeypatch, criterion, rule, eps):
    """Every layer a candidate (no trained heads), segments priced by hand; the reference is transformers'
    probabilities on the calibration texts, each subset's thresholds fitted by hand: a cascade of risk-rule
    thresholds on agreement, or one joint threshold on accuracy against the labels."""
    import itertools

    import eec.targets.classifier_profiling as profiling
    from eec.calib.thresholds import risk_controlled_threshold
    from tests.test_thresholds import _joint_by_hand

    model, tok, art = encoders["bert"]
    data = art.parent / "bert.jsonl"
    plain, head, final = [1.0, 3.0, 0.5], [0.2, 0.2, 2.5], 6.0  # seconds: layers 1, 2, 3 alone, their heads
    measured = []

    def hand_prices(sessions, x, heads=True, rounds=50, inputs=None, side=None):
        measured.append((len(sessions), heads, x.shape, inputs))
        return [p + h for p, h in zip(plain, head)] + [final] if heads else list(plain)

    monkeypatch.setattr(profiling, "measure", hand_prices)
    manifest = compile_encoder(art.parent / "bert", tmp_path / "auto.eec", exits="auto", data=data,
                               metric="max-prob", placement_eps=eps, criterion=criterion, rule=rule)
    assert measured[0][:2] == (4, True) and measured[1][:2] == (3, False) and measured[0][2][0] == 1
    assert all(names in (["input_ids"], ["hidden_in"]) for _, _, _, inputs in measured for names in inputs)  # as a
    # text alone runs: the graphs without the padding mask

    rows = [json.loads(line) for line in open(data)]
    texts, labels = [r["text"] for r in rows], np.array([int(r["label"][-1]) for r in rows])
    ref = reference(model, tok, texts)
    conf = np.stack([ref[k].max(-1) for k in (1, 2, 3)], 1)
    answers, last = np.stack([ref[k].argmax(-1) for k in (1, 2, 3)], 1), ref[LAYERS].argmax(-1)
    if criterion == "agreement":
        agreed = answers == last[:, None]
    else:
        agreed = ~((answers != labels[:, None]) & (last == labels)[:, None])

    def price(kept: tuple[int, ...]) -> float:
        remaining, taus = np.ones(len(texts), bool), []
        if rule == "joint" and kept:
            taus = [_joint_by_hand(conf[:, list(kept)], agreed[:, list(kept)], eps, 0.1)] * len(kept)
        for k in kept if rule == "risk" else ():
            taus.append(risk_controlled_threshold(conf[remaining, k], agreed[remaining, k], eps))
            remaining &= ~(conf[:, k] >= taus[-1])
        total = 0.0
        for i in range(len(texts)):
            for layer in range(3):
                total += plain[layer] + (head[layer] if layer in kept else 0.0)
                if layer in kept and conf[i, layer] >= taus[kept.index(layer)]:
                    break
            else:
                total += final
        return total / len(texts)

    prices = {kept: price(kept) for n in range(4) for kept in itertools.combinations(range(3), n)}
    best = min(prices, key=prices.get)
    # equal prices (every text leaving at the first exit kept, say) go to the fewest exits, as placement does
    best = min((k for k in prices if prices[k] <= prices[best] * (1 + 1e-9)), key=len)
    assert all(p <= prices[best] * (1 + 1e-9) or p > prices[best] * 1.01 for p in prices.values()), prices
    assert manifest.exits == [k + 1 for k in best], prices
    assert manifest.placement["expected_s"] == pytest.approx(prices[best], rel=1e-9)
    assert [s.stop for s in manifest.segments] == [k + 2 for k in best] + [LAYERS + 1]
    clf = load(tmp_path / "auto.eec")  # the chosen set, rebuilt alone, calibrated, and running
    got = clf.classify(TEXTS, mode="full")
    np.testing.assert_allclose(got.probs, reference(model, tok, TEXTS)[LAYERS], rtol=0, atol=2e-5)
    cal = clf.manifest.calibration  # what ε means by default is what the exits were placed for
    assert (cal.criterion, cal.rule) == (criterion, rule) and manifest.placement["rule"] == rule
    if best:
        assert clf.thresholds_for(eps) == pytest.approx(clf.thresholds_for(eps, rule=rule, criterion=criterion))
        other = clf.thresholds_for(eps, rule="risk" if rule == "joint" else "joint", criterion=criterion)
        assert clf.thresholds_for(eps) != pytest.approx(other)  # the default is not the other rule's


def test_bad_compile_inputs(tmp_path, encoders):
    from tests.test_cli_errors import run_fails

    _, _, art = encoders["bert"]
    hf = art.parent / "bert"
    (tmp_path / "nolabel.jsonl").write_text(json.dumps({"text": "the cat", "label": "class7"}) + "\n")
    (tmp_path / "notext.csv").write_text("sentence,label\nthe cat,class0\n")
    out = tmp_path / "a.eec"
    run_fails(["compile", hf, "-o", out, "--data", tmp_path / "nolabel.jsonl"], "unknown label 'class7'",
              "class0, class1, class2")
    run_fails(["compile", hf, "-o", out, "--data", tmp_path / "notext.csv"], "no 'text' column")
    run_fails(["compile", hf, "-o", out, "--exits", "4"], "exits sit after 1..3 layers")
    run_fails(["compile", hf, "-o", out, "--exits", "auto"], "--exits auto needs held-out texts", "--data")
    run_fails(["compile", hf, "-o", out, "--exits", "auto", "--data", art.parent / "bert.jsonl", "--eps", "1.5"],
              "--eps must be in [0, 1]")
    (tmp_path / "unlabeled.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n")
    run_fails(["compile", hf, "-o", out, "--criterion", "labels"], "unknown criterion 'labels'", "agreement, accuracy")
    run_fails(["compile", hf, "-o", out, "--rule", "best"], "unknown threshold rule 'best'", "risk, valade, joint")
    run_fails(["compile", hf, "-o", out, "--criterion", "accuracy"], "needs labeled calibration data")
    run_fails(["compile", hf, "-o", out, "--criterion", "accuracy", "--data", tmp_path / "unlabeled.jsonl"],
              "needs labels")
    (tmp_path / "unlabeled.jsonl").unlink()
    config = json.loads((hf / "config.json").read_text())
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2ForSequenceClassification"],
                                                   "n_layer": 2, "n_embd": 32, "n_head": 4}))
    run_fails(["compile", other, "-o", out], "'gpt2' is not supported", "bert, roberta, distilbert, electra, albert")
    grouped = tmp_path / "albert"
    tok = tokenizer("bert")
    model = tiny_classifier("albert", len(tok), tok.pad_token_id)
    model.config.inner_group_num = 2  # two layers a group: not cut by eec
    model.save_pretrained(grouped)
    tok.save_pretrained(grouped)
    run_fails(["compile", grouped, "-o", out], "one layer a group")
    shutil.rmtree(grouped)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "nolabel.jsonl", "notext.csv"]
    assert config["model_type"] == "bert"
    with pytest.raises(UnsupportedModelError):
        compile_encoder(other, tmp_path / "b.eec")


def test_profile_inspect_and_calibrate_on_the_command_line(tmp_path, encoders):
    import shutil

    from typer.testing import CliRunner

    from eec.cli.main import app

    model, tok, art = encoders["bert"]
    copy = tmp_path / "bert.eec"
    shutil.copytree(art, copy)
    # Calibration labels that full mode always gets wrong (its least likely class, so no near-tie can make it
    # right on another CPU): under ε of accuracy no exit can turn a right answer wrong, so exits take what
    # agreement refuses, whatever the random weights.
    words = " ".join(CORPUS).split()
    rng = np.random.default_rng(5)
    calib = [" ".join(rng.choice(words, rng.integers(1, 14))) for _ in range(60)]
    wrong = reference(model, tok, calib)[LAYERS].argmin(-1)
    with open(tmp_path / "calib.jsonl", "w") as f:
        f.write("".join(json.dumps({"text": t, "label": f"class{y}"}) + "\n" for t, y in zip(calib, wrong)))
    again = CliRunner().invoke(app, ["calibrate", str(copy), "--data", str(tmp_path / "calib.jsonl")])
    assert again.exit_code == 0, again.output
    assert load(copy).manifest.calibration.samples == len(calib)
    labels = rng.integers(0, 3, len(TEXTS))
    with open(tmp_path / "test.csv", "w") as f:
        f.write("text,label\n" + "".join(f'"{t}",class{y}\n' for t, y in zip(TEXTS, labels)))
    result = CliRunner().invoke(app, ["profile", str(copy), "--data", str(tmp_path / "test.csv"), "--eps", "0.8",
                                      "--batch", "1,4", "--rounds", "1", "--json", str(tmp_path / "rows.json"),
                                      "--criterion", "accuracy"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "rows.json").read_text())
    full = reference(model, tok, TEXTS)[LAYERS].argmax(-1)
    assert rows[0]["epsilon"] is None and rows[0]["accuracy"] == pytest.approx((full == labels).mean())
    exits = load(copy).classify(TEXTS, epsilon=0.8, criterion="accuracy").exits
    agreement = load(copy).classify(TEXTS, epsilon=0.8, criterion="agreement").exits
    assert (exits < LAYERS).any() and (exits != agreement).any(), exits
    assert rows[1]["exits"] == {str(k): int((exits == k).sum()) for k in np.unique(exits)}
    shown = CliRunner().invoke(app, ["inspect", str(copy)])
    assert shown.exit_code == 0 and "text classifier" in shown.output and "exits after layers: 1, 2" in shown.output


def test_a_text_classifier_split_answers_as_the_whole_model(encoders):
    """The embeddings and layer 1 on a device, the rest on an eec server: texts of mixed lengths (the
    padding mask crosses the wire with the hidden states) get the whole model's labels and exits."""
    pytest.importorskip("fastapi")
    from eec.serve.app import create_app
    from tests.test_serve import Server

    _, _, path = encoders["bert"]
    whole = load(path)
    words = " ".join(CORPUS).split()
    texts = [" ".join(words[i: i + 2 + 3 * (i % 5)]) for i in range(24)]
    taus = []
    for k in range(len(whole.exits)):
        only = [math.inf] * len(whole.exits)
        only[k] = -math.inf
        taus.append(float(np.median(whole.classify(texts, thresholds=only, metric="max-prob").probs.max(-1))))
    s = Server(create_app(path, split=1))
    try:
        device = load(path, split=1, server=s.url)
        want, got = whole.classify(texts, thresholds=taus, metric="max-prob"), device.classify(
            texts, thresholds=taus, metric="max-prob", batch_size=8)
        assert set(want.exits.tolist()) & {0, 1} and set(want.exits.tolist()) - {0, 1}, want.exits
        assert got.labels.tolist() == want.labels.tolist() and got.exits.tolist() == want.exits.tolist()
        np.testing.assert_allclose(got.probs, want.probs, rtol=1e-4, atol=1e-5)
        assert not got.fallback.any()
    finally:
        s.close()


class Refused:
    """A session that must not run: the graph with the padding mask, in a call without padding."""

    def run(self, *a, **k):
        raise AssertionError("the graph with the padding mask ran on a call without padding")


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_calls_without_padding_run_the_graphs_without_the_mask(encoders, family):
    """One text, or texts all of one length, run each segment's twin without the padding mask; they answer as
    transformers does, and as the same texts padded inside a mixed batch (the graphs with the mask) do."""
    from eec.runtime.classifier_manifest import UNPADDED

    model, tok, art = encoders[family]
    clf = load(art)
    for seg in clf.manifest.segments:  # every graph has its twin
        assert {UNPADDED[role] for role in ("plain", "with_head") if role in seg.graphs} <= set(seg.graphs)
    assert not any(clf.sessions)  # each set is opened at its first call: nothing yet
    for graphs, seg in zip(clf.sessions, clf.manifest.segments):
        graphs.update({role: Refused() for role in ("plain", "with_head") if role in seg.graphs})
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    same = [t for t, n in zip(TEXTS, lengths) if n == lengths[0]]
    assert len(same) >= 2  # "the cat sat", "functions return values"
    ref = reference(model, tok, TEXTS)
    taus = [middle_cut(ref[k].max(-1)) for k in (1, 2)]
    alone = [clf.classify(t, thresholds=taus, metric="max-prob") for t in TEXTS]
    full = [clf.classify(t, mode="full") for t in TEXTS]
    together = clf.classify(same, mode="full", batch_size=8)
    for graphs in clf.sessions:  # the twins opened at their first call
        assert all(role.endswith("_unpadded") for role in graphs if not isinstance(graphs[role], Refused))
    for i, r in enumerate(full):
        np.testing.assert_allclose(r.probs[0], ref[LAYERS][i], rtol=0, atol=2e-5)
    np.testing.assert_allclose(together.probs, ref[LAYERS][[TEXTS.index(t) for t in same]], rtol=0, atol=2e-5)
    for graphs in clf.sessions:  # the graphs with the mask opened at their first padded call, the twins forgotten
        graphs.clear()
    mixed = clf.classify(TEXTS, thresholds=taus, metric="max-prob", batch_size=len(TEXTS))
    runs, _, _ = clf.text.batches(TEXTS, len(TEXTS))
    assert len([r for rows, _, side in runs if not side["attention_mask"].all() for r in rows]) >= 4  # ran padded
    assert {"plain", "with_head"} & set(clf.sessions[0])  # the first segment's masked graph, opened for them
    assert [int(r.exits[0]) for r in alone] == mixed.exits.tolist()
    assert [int(r.labels[0]) for r in alone] == mixed.labels.tolist()
    np.testing.assert_allclose(np.concatenate([r.probs for r in alone]), mixed.probs, rtol=0, atol=1e-6)
    assert len(set(mixed.exits.tolist())) > 1


def test_an_artifact_without_the_unpadded_graphs_runs_on_the_masked_ones(tmp_path, encoders):
    """Artifacts compiled before the twins existed (or whose mask could not be taken out) have none: a text
    alone runs the graphs with the mask; twins on a branched network or without their role are refused."""
    from eec.errors import ArtifactError

    _, _, art = encoders["bert"]
    copy = tmp_path / "old.eec"
    shutil.copytree(art, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    for seg in raw["segments"]:
        for role in [r for r in seg["graphs"] if r.endswith("_unpadded")]:
            (copy / seg["graphs"].pop(role)).unlink()
            raw["files"] = {k: v for k, v in raw["files"].items() if (copy / k).exists()}
    (copy / "manifest.json").write_text(json.dumps(raw))
    old, new = load(copy), load(art)
    assert all(not twins for twins in old.twins)
    for text in TEXTS[:4]:
        a, b = old.classify(text, thresholds=-math.inf), new.classify(text, thresholds=-math.inf)
        np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-6)
    bad = json.loads((art / "manifest.json").read_text())
    bad["segments"][-1]["graphs"]["with_head_unpadded"] = bad["segments"][-1]["graphs"]["plain_unpadded"]
    (copy / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="optionally plain_unpadded"):
        load(copy, verify=False)
