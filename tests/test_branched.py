"""Branched classifiers: save_early_exit -> eec compile -> classify, against PyTorch run by hand.

The references are the user's own PyTorch modules: every exit's probabilities
come from running the stages and heads in torch, and the exit each sample
should take is decided by hand from them (the first exit whose confidence
reaches its threshold), independently of the runtime's shrinking batch.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eec.compiler import save_early_exit
from eec.compiler.branched_pipeline import compile_branched
from eec.errors import ArtifactError, InputError
from eec.runtime import load


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def pool_head(c: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


class ResNetLike(nn.Module):
    """Convolutions with batch norm and residual connections, pooling; heads after stages 0, 1 and the last."""

    input_shape = (3, 8, 8)
    scale = 1.6

    def __init__(self, classes: int = 7):
        super().__init__()
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            Residual(8),
            nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
            Residual(16),
        ])
        self.exits = nn.ModuleDict({"0": pool_head(8, classes), "1": pool_head(8, classes), "2": pool_head(16, classes),
                                    "3": nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, classes))})


class MLP(nn.Module):
    input_shape = (12,)
    scale = 3.0

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.Linear(12, 32), nn.GELU()) for _ in range(1)]
                                    + [nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(2)])
        self.exits = nn.ModuleDict({"0": nn.Linear(32, classes), "2": nn.Linear(32, classes)})


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MeanHead(nn.Module):
    def __init__(self, d: int, classes: int):
        super().__init__()
        self.proj = nn.Linear(d, classes)

    def forward(self, x):
        return self.proj(x.mean(1))


class Attention(nn.Module):
    """A small attention block per stage over a sequence of 6 vectors."""

    input_shape = (6, 16)
    scale = 2.0

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stages = nn.ModuleList([Block(16) for _ in range(3)])
        self.exits = nn.ModuleDict({str(k): MeanHead(16, classes) for k in range(3)})


NETWORKS = {"resnet": ResNetLike, "mlp": MLP, "attention": Attention}


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = NETWORKS[name]()
    for m in net.modules():  # batch norm with running statistics other than 0 and 1, so that it is not a no-op
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    for p in net.parameters():  # wider weights: random heads then disagree with each other and are confident
        p.data.mul_(net.scale)
    return net.eval()


def inputs(net: nn.Module, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *net.input_shape)).astype(np.float32)


def torch_probs(net: nn.Module, x: np.ndarray) -> dict[int, np.ndarray]:
    """Every head's probabilities, run in PyTorch stage by stage."""
    out, h = {}, torch.from_numpy(x)
    with torch.no_grad():
        for i, stage in enumerate(net.stages):
            h = stage(h)
            if str(i) in net.exits:
                out[i] = torch.softmax(net.exits[str(i)](h).double(), -1).numpy()
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Each network saved and compiled with all its exits (calibrated on 200 random inputs)."""
    root = tmp_path_factory.mktemp("branched")
    made = {}
    for name in NETWORKS:
        net = make(name)
        save_early_exit(net, torch.from_numpy(inputs(net, 4, seed=9)), root / f"{name}.pt")
        np.savez(root / f"{name}.npz", x=inputs(net, 200, seed=2))
        compile_branched(root / f"{name}.pt", root / f"{name}.eec", data=root / f"{name}.npz")
        made[name] = (net, root / f"{name}.eec")
    return made


@pytest.mark.parametrize("name", list(NETWORKS))
def test_full_mode_equals_pytorch(compiled, name):
    net, art = compiled[name]
    model = load(art)
    final = len(net.stages) - 1
    for batch in range(1, 10):
        x = inputs(net, batch, seed=batch)
        want = torch_probs(net, x)[final]
        got = model.classify(x, mode="full")
        np.testing.assert_allclose(got.probs, want, rtol=0, atol=2e-5)
        assert (got.labels == want.argmax(-1)).all()
        assert (got.exits == final).all()


def middle_cut(confidence: np.ndarray, gap: float = 1e-4) -> float:
    c = np.sort(confidence)
    cuts = [(abs(i + 1 - len(c) / 2), (c[i] + c[i + 1]) / 2) for i in range(len(c) - 1) if c[i + 1] - c[i] > gap]
    return float(min(cuts)[1])


def hand_exits(probs: dict[int, np.ndarray], exits: list[int], taus: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Max-probability early exit decided sample by sample from PyTorch's probabilities."""
    final = max(probs)
    n = len(probs[final])
    left, labels = np.full(n, final), probs[final].argmax(-1)
    for i in range(n):
        for k, tau in zip(exits, taus):
            if probs[k][i].max() >= tau:
                left[i], labels[i] = k, probs[k][i].argmax()
                break
    return left, labels


@pytest.mark.parametrize("name", list(NETWORKS))
def test_batched_early_exit_matches_pytorch_and_each_sample_alone(compiled, name):
    net, art = compiled[name]
    model = load(art)
    x = inputs(net, 9, seed=5)
    ref = torch_probs(net, x)
    # thresholds near the median confidence of each exit on this batch (some samples leave at each exit), in
    # a gap between samples wider than float32's error, so that the hand decision is not a coin toss
    taus = [middle_cut(ref[k].max(-1)) for k in model.exits]
    want_exits, want_labels = hand_exits(ref, model.exits, taus)
    assert len(set(want_exits)) > 1, "the thresholds should send samples to different exits"
    got = model.classify(x, thresholds=taus, metric="max-prob")
    assert got.exits.tolist() == want_exits.tolist()
    assert got.labels.tolist() == want_labels.tolist()
    for i in range(len(x)):
        np.testing.assert_allclose(got.probs[i], ref[int(got.exits[i])][i], rtol=0, atol=2e-5)
        alone = model.classify(x[i:i + 1], thresholds=taus, metric="max-prob")
        assert (alone.labels[0], alone.exits[0]) == (got.labels[i], got.exits[i])
        np.testing.assert_allclose(alone.probs[0], got.probs[i], rtol=0, atol=1e-6)  # kernels differ by batch size
    # the batch shrinks: each segment ran on exactly the samples that had not left before it
    remaining = [int((want_exits >= seg.start).sum()) for seg in model.manifest.segments]
    assert got.stats.segment_samples == [r for r in remaining if r]
    assert sum(got.stats.exits.values()) == len(x)
    assert all(count == int((want_exits == k).sum()) for k, count in got.stats.exits.items())


@pytest.mark.parametrize("name", list(NETWORKS))
def test_each_weight_is_stored_once(compiled, name):
    """A segment's graph with its head holds the segment again: stored once, the artifact's weights file is
    about the network's own parameters (PyTorch's count; batch-norm statistics are buffers, folded in)."""
    net, art = compiled[name]
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    stored = (art / "graphs" / "weights.data").stat().st_size
    assert stored <= 1.1 * params, (stored, params)  # weights under 1 KB stay inside their graphs


def test_infinite_thresholds_give_full_mode_and_first_exit(compiled):
    net, art = compiled["resnet"]
    model = load(art)
    x = inputs(net, 7, seed=3)
    ref = torch_probs(net, x)
    never = model.classify(x, thresholds=[math.inf] * len(model.exits))
    full = model.classify(x, mode="full")
    np.testing.assert_array_equal(never.labels, full.labels)
    np.testing.assert_array_equal(never.probs, full.probs)
    always = model.classify(x, thresholds=[-math.inf] * len(model.exits))
    first = model.exits[0]
    assert (always.exits == first).all()
    assert always.labels.tolist() == ref[first].argmax(-1).tolist()
    assert always.stats.segment_samples == [7]


# --- metrics on hand-built cases ------------------------------------------------------------------------------


class Known(nn.Module):
    """Exits whose answers are given: input [batch, exits, classes] holds each exit's probabilities, the stages
    pass it on, and head k returns the log of row k (so its softmax is that row)."""

    class Pick(nn.Module):
        def __init__(self, k: int):
            super().__init__()
            self.k = k

        def forward(self, x):
            return torch.log(x[:, self.k])

    class Same(nn.Module):
        def forward(self, x):
            return x * 1.0

    def __init__(self, exits: int):
        super().__init__()
        self.stages = nn.ModuleList([self.Same() for _ in range(exits)])
        self.exits = nn.ModuleDict({str(k): self.Pick(k) for k in range(exits)})


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    root = tmp_path_factory.mktemp("known")
    save_early_exit(Known(4), torch.full((2, 4, 3), 1 / 3), root / "known.pt")
    compile_branched(root / "known.pt", root / "known.eec")
    return load(root / "known.eec")


def one_hot_ish(labels: list[int], classes: int = 3, top: float = 0.8) -> np.ndarray:
    rows = np.full((len(labels), classes), (1 - top) / (classes - 1))
    rows[np.arange(len(labels)), labels] = top
    return rows


def test_patience_leaves_when_the_last_exits_agree(known):
    # each sample's answers at exits 0, 1, 2 and the final classifier
    answers = {"a": [0, 0, 0, 1], "b": [0, 1, 1, 1], "c": [0, 1, 2, 1], "d": [2, 2, 2, 2]}
    x = np.stack([one_hot_ish(a) for a in answers.values()]).astype(np.float32)
    # PABEE with patience 1 (leave once an answer is unchanged at one more exit): a run of 2
    got = known.classify(x, thresholds=[2, 2, 2], metric="patience")
    assert got.exits.tolist() == [1, 2, 3, 1]
    assert got.labels.tolist() == [0, 1, 1, 2]
    # patience 2: a run of 3
    got = known.classify(x, thresholds=[3, 3, 3], metric="patience")
    assert got.exits.tolist() == [2, 3, 3, 2]
    assert got.labels.tolist() == [0, 1, 1, 2]


def test_an_exit_nobody_may_leave_at_runs_without_its_head_unless_a_later_score_needs_it(known):
    from eec.runtime.manifest import PLAIN, WITH_HEAD

    ran = []

    class Recorder:
        def __init__(self, k, role, session):
            self.k, self.role, self.session = k, role, session

        def run(self, names, feeds):
            ran.append((self.k, self.role))
            return self.session.run(names, feeds)

    saved = [dict(g) for g in known.sessions]
    known.sessions = [{role: Recorder(k, role, s) for role, s in g.items()} for k, g in enumerate(saved)]
    try:
        answers = [[0, 1, 2, 1], [2, 2, 2, 2]]
        x = np.stack([one_hot_ish(a) for a in answers]).astype(np.float32)
        got = known.classify(x, thresholds=[math.inf, 0.7, math.inf], metric="max-prob")
        assert ran == [(0, PLAIN), (1, WITH_HEAD)]  # both leave at exit 1 (top 0.8)
        assert got.exits.tolist() == [1, 1] and got.labels.tolist() == [1, 2]
        assert got.stats.exits == {0: 0, 1: 2}
        ran.clear()
        # patience reads every exit's answer: exit 0's head must run though nobody may leave there
        got = known.classify(x, thresholds=[math.inf, 2, math.inf], metric="patience")
        assert ran[:2] == [(0, WITH_HEAD), (1, WITH_HEAD)]
        assert got.exits.tolist() == [3, 1] and got.labels.tolist() == [1, 2]
    finally:
        known.sessions = saved


def test_ensemble_is_the_normalised_geometric_mean_of_the_exits_so_far(known):
    p0 = np.array([0.6, 0.3, 0.1])
    p1 = np.array([0.2, 0.7, 0.1])
    p2 = np.array([0.1, 0.1, 0.8])
    final = np.array([0.3, 0.4, 0.3])
    x = np.stack([np.stack([p0, p1, p2, final])]).astype(np.float32)
    # exit 0 alone: 0.6 < 0.61, stays; exits 0 and 1: sqrt of products, normalised
    g = np.sqrt(p0 * p1)
    g /= g.sum()
    assert p0.max() < 0.61 and g.max() < 0.61
    got = known.classify(x, thresholds=[0.61, g.max() - 1e-4, 2.0], metric="ensemble")
    assert got.exits.tolist() == [1]
    assert got.labels.tolist() == [1]
    np.testing.assert_allclose(got.probs[0], g, atol=1e-6)
    # not confident enough at exit 1 either: exit 2 sees the cube root of three products
    c = np.cbrt(p0 * p1 * p2)
    c /= c.sum()
    got = known.classify(x, thresholds=[0.61, g.max() + 1e-4, c.max() - 1e-4], metric="ensemble")
    assert got.exits.tolist() == [2]
    np.testing.assert_allclose(got.probs[0], c, atol=1e-6)
    assert got.labels.tolist() == [int(c.argmax())]
    # the final classifier's answer is its own, not the ensemble's
    got = known.classify(x, thresholds=[2.0, 2.0, 2.0], metric="ensemble")
    np.testing.assert_allclose(got.probs[0], final, atol=1e-6)


def test_margin_and_entropy_by_hand(known):
    rows = np.array([[0.5, 0.45, 0.05], [0.5, 0.25, 0.25]])
    x = np.stack([np.stack([r, r, r, r]) for r in rows]).astype(np.float32)
    # top-2 margins 0.05 and 0.25: a threshold of 0.1 lets only the second leave at exit 0
    got = known.classify(x, thresholds=[0.1, 0.1, 0.1], metric="top2-margin")
    assert got.exits.tolist() == [3, 0]
    neg_h = [float(np.sum(r * np.log(r))) for r in rows]  # -0.83 and -1.04: the first is less uncertain
    got = known.classify(x, thresholds=[(neg_h[0] + neg_h[1]) / 2] * 3, metric="neg-entropy")
    assert got.exits.tolist() == [0, 3]


# --- trust and bad input ----------------------------------------------------------------------------------------


class Evil:
    """Unpickling this creates the marker file: proof that a pickle in a model file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_a_model_file_never_runs(tmp_path, compiled):
    from tests.test_cli_errors import run_fails

    marker = tmp_path / "pwned"
    torch.save({"format": "eec-checkpoint", "payload": Evil(marker)}, tmp_path / "evil.pt")
    run_fails(["compile", tmp_path / "evil.pt", "-o", tmp_path / "a.eec"], "not a readable eec checkpoint")
    assert not marker.exists() and not (tmp_path / "a.eec").exists()
    # a branched network file with a pickle beside its graphs compiles, and the pickle is never read
    net, _ = compiled["mlp"]
    good = tmp_path / "net.pt"
    save_early_exit(net, torch.from_numpy(inputs(net, 2)), good)
    with zipfile.ZipFile(good, "a") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(marker)))
    compile_branched(good, tmp_path / "b.eec")
    assert not marker.exists()


def test_a_modified_graph_in_a_network_file_is_refused(tmp_path, compiled):
    net, _ = compiled["mlp"]
    good = tmp_path / "net.pt"
    save_early_exit(net, torch.from_numpy(inputs(net, 2)), good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, data[:-1] + bytes([data[-1] ^ 1]) if item.filename == "stages/1.onnx" else data)
    with pytest.raises(InputError, match="stages/1.onnx does not match its sha256"):
        compile_branched(bad, tmp_path / "a.eec")
    assert not (tmp_path / "a.eec").exists()


def test_a_modified_classifier_artifact_is_refused(tmp_path, compiled):
    import shutil

    _, art = compiled["mlp"]
    copy = tmp_path / "copy.eec"
    shutil.copytree(art, copy)
    graph = copy / "graphs" / "seg1.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        load(copy)


@pytest.mark.parametrize("module, message", [
    (nn.Sequential(nn.Linear(4, 4)), "needs `stages: nn.ModuleList` and `exits: nn.ModuleDict`"),
    ("unknown stage", "exits key '7' names no stage"),
    ("no final", "no head after the last stage"),
])
def test_modules_outside_the_contract_are_refused(tmp_path, module, message):
    if isinstance(module, str):
        net = MLP()
        if module == "unknown stage":
            net.exits["7"] = nn.Linear(32, 5)
        else:
            del net.exits["2"]
        module = net
    with pytest.raises(InputError, match=message):
        save_early_exit(module, torch.zeros(2, 12), tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_bad_classify_inputs_get_one_line_errors(compiled):
    net, art = compiled["resnet"]
    model = load(art)
    x = inputs(net, 3)
    cases = [
        (x[0], "add the batch axis"),  # one sample without the batch axis
        (x.astype(np.float64), "must be float32"),
        (np.zeros((3, 1, 8, 8), np.float32), "shape [batch, 3, 8, 8]"),  # one channel, not three
        (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x).astype(np.float32), "NaN"),
        (x[:0], "empty"),
        (x.tolist(), "numpy array"),
    ]
    for bad, message in cases:
        with pytest.raises(InputError) as info:
            model.classify(bad)
        assert message in str(info.value) and "\n" not in str(info.value)
    for eps in (-0.1, 1.5):
        with pytest.raises(InputError, match=r"epsilon must be a number in \[0, 1\]"):
            model.classify(x, epsilon=eps)
    with pytest.raises(InputError, match="2 thresholds for 3 exits"):
        model.classify(x, thresholds=[0.5, 0.5])
    with pytest.raises(InputError, match="unknown metric"):
        model.classify(x, metric="vibes")


def test_bad_compile_inputs_from_the_command_line(tmp_path, compiled):
    from tests.test_cli_errors import leftovers, run_fails

    net, _ = compiled["mlp"]
    save_early_exit(net, torch.from_numpy(inputs(net, 2)), tmp_path / "net.pt")
    np.savez(tmp_path / "noX.npz", y=np.zeros(3, np.int64))
    np.savez(tmp_path / "shape.npz", x=np.zeros((3, 11), np.float32))
    np.savez(tmp_path / "labels.npz", x=inputs(net, 3), y=np.array([0, 1, 9]))
    out = tmp_path / "a.eec"
    run_fails(["compile", tmp_path / "net.pt", "-o", out, "--data", tmp_path / "noX.npz"], "has no array 'x'")
    run_fails(["compile", tmp_path / "net.pt", "-o", out, "--data", tmp_path / "shape.npz"], "[samples, 12]")
    run_fails(["compile", tmp_path / "net.pt", "-o", out, "--data", tmp_path / "labels.npz"], "labels in 0..4")
    run_fails(["compile", tmp_path / "net.pt", "-o", out, "--exits", "1"], "no head follows that stage")
    run_fails(["compile", tmp_path / "net.pt", "-o", out, "--precision", "int8"], "--data")
    run_fails(["compile", tmp_path / "net.pt", "-o", out, "--shortlist", "8"], "applies to decoders")
    assert leftovers(tmp_path) == ["labels.npz", "net.pt", "noX.npz", "shape.npz"]


# --- calibration -----------------------------------------------------------------------------------------------


def calibration_set(n: int, seed: int) -> np.ndarray:
    """Inputs for `Known` whose exits are right (agree with the final classifier) about as often as they are
    confident: exit k names the final class with probability equal to its top probability."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 3, n)
    x = np.empty((n, 4, 3), np.float32)
    x[:, 3] = one_hot_ish(final.tolist(), top=0.9)
    for k in range(3):
        top = rng.uniform(0.34, 1.0, n)
        right = rng.random(n) < top
        label = np.where(right, final, (final + rng.integers(1, 3, n)) % 3)
        for i in range(n):
            x[i, k] = one_hot_ish([label[i]], top=top[i])[0]
    return x


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    save_early_exit(Known(4), torch.full((2, 4, 3), 1 / 3), root / "known.pt")
    x = calibration_set(1000, seed=0)
    np.savez(root / "cal.npz", x=x, y=x[:, 3].argmax(-1))
    compile_branched(root / "known.pt", root / "known.eec", data=root / "cal.npz")
    return load(root / "known.eec"), x


@pytest.mark.parametrize("rule", ["valade", "risk"])
def test_epsilon_holds_on_the_calibration_set(calibrated, rule):
    model, x = calibrated
    full = x[:, 3].argmax(-1)
    for eps in (0.8, 0.9, 0.95):
        got = model.classify(x, epsilon=eps, rule=rule, metric="max-prob")
        exited = got.exits < 3
        assert exited.mean() > 0.1, f"at ε {eps} some samples should exit ({exited.mean():.2f})"
        assert (got.labels == full)[exited].mean() >= eps


@pytest.mark.parametrize("metric", ["max-prob", "top2-margin", "neg-entropy", "patience", "ensemble",
                                    "patience-confidence"])
def test_calibration_replay_predicts_the_runtime_and_epsilon_holds(calibrated, metric):
    """The thresholds come from replaying stored probabilities; the runtime run on those same samples must give
    each sample the exit and answer the replay gave it, and agree with the final classifier's own answer (full
    mode) at ε: the exited samples under the per-exit risk rule, all samples under the joint rule. The
    reference for agreement is the input's last row by hand. (The labels are full mode's answers, so ε of
    accuracy, the artifact's default, is ε of agreement here.)"""
    from eec.calib.classifier_calibration import simulate

    model, x = calibrated
    full = x[:, 3].argmax(-1)
    probs, _ = model.calibration()
    stages = [seg.exit for seg in model.manifest.segments]
    for rule in ("risk", "joint"):
        for eps in (0.8, 0.95):
            taus = model.thresholds_for(eps, metric, rule=rule)
            got = model.classify(x, thresholds=taus, metric=metric)
            replayed = simulate(probs, taus, metric)
            assert got.exits.tolist() == [stages[k] for k in replayed["segment"]]
            assert got.labels.tolist() == replayed["answer"].tolist()
            assert replayed["agreement"] == float((got.labels == full).mean())
            exited = got.exits < 3
            if exited.any():
                held = (got.labels == full)[exited] if rule == "risk" else got.labels == full
                assert held.mean() >= eps, (rule, eps)
            assert (got.labels == full)[~exited].all()


def test_epsilon_carries_over_to_new_samples(calibrated):
    model, _ = calibrated
    x = calibration_set(4000, seed=1)
    full = x[:, 3].argmax(-1)
    for eps in (0.8, 0.9):
        got = model.classify(x, epsilon=eps, rule="risk")  # at δ 0.1, the artifact's default metric
        exited = got.exits < 3
        assert (got.labels == full)[exited].mean() >= eps - 0.02
        got = model.classify(x, epsilon=eps)  # the artifact's default, the joint rule: ε over all samples
        assert (got.exits < 3).mean() > 0.3 and (got.labels == full).mean() >= eps - 0.02


# --- precisions ------------------------------------------------------------------------------------------------


def test_int8_and_fp16_artifacts_stay_close_to_pytorch(tmp_path, compiled):
    import onnx

    net, art = compiled["resnet"]
    source, data = art.with_suffix(".pt"), art.with_suffix(".npz")
    compile_branched(source, tmp_path / "int8.eec", data=data, precision="int8")
    compile_branched(source, tmp_path / "fp16.eec", target="rtx-4090")  # runs here on onnxruntime's CPU kernels
    x = inputs(net, 64, seed=7)
    ref = torch_probs(net, x)[len(net.stages) - 1]
    top2 = np.sort(ref, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05  # samples whose label no rounding should change

    fp16 = load(tmp_path / "fp16.eec").classify(x, mode="full")
    np.testing.assert_allclose(fp16.probs, ref, atol=3e-3)
    assert (fp16.labels == ref.argmax(-1))[clear].all()

    int8 = load(tmp_path / "int8.eec")
    assert int8.manifest.precision == "int8"
    for seg in int8.manifest.segments:  # every convolution reads quantized weights and activations
        graph = onnx.load(str(tmp_path / "int8.eec" / seg.graphs["plain"])).graph
        producers = {o: n.op_type for n in graph.node for o in n.output}
        convs = [n for n in graph.node if n.op_type == "Conv"]
        assert convs and all(producers.get(n.input[0]) == producers.get(n.input[1]) == "DequantizeLinear" for n in convs)
    got = int8.classify(x, mode="full")
    assert np.abs(got.probs - ref).max() < 0.08
    assert (got.labels == ref.argmax(-1))[clear].mean() >= 0.95


# --- placement -------------------------------------------------------------------------------------------------


def test_exits_auto_keeps_the_cheapest_set_on_hand_prices(tmp_path, monkeypatch):
    import itertools

    import eec.compiler.branched_pipeline as pipeline
    from eec.calib.thresholds import risk_controlled_threshold

    # hand prices (seconds a sample at batch 1): each segment between heads alone, and with its head
    plain, head = [1.0, 4.0, 0.5], [3.0, 0.2, 0.2]
    final = 10.0
    monkeypatch.setattr(pipeline, "measure", lambda sessions, x, heads=True: (
        [p + h for p, h in zip(plain, head)] + [final] if heads else list(plain)))
    save_early_exit(Known(4), torch.full((2, 4, 3), 1 / 3), tmp_path / "known.pt")
    x = calibration_set(600, seed=3)
    np.savez(tmp_path / "cal.npz", x=x)
    eps = 0.9
    manifest = compile_branched(tmp_path / "known.pt", tmp_path / "auto.eec", exits="auto", data=tmp_path / "cal.npz",
                                metric="max-prob", placement_eps=eps, rule="risk")

    # by hand: every subset, its cascade thresholds on the exits it keeps, each sample's exit, its price
    conf, answer = x.max(-1), x.argmax(-1)  # the exits' probabilities are the inputs themselves
    agreed = answer[:, :3] == answer[:, 3:]

    def price(kept: tuple[int, ...]) -> float:
        remaining, taus = np.ones(len(x), bool), []
        for k in kept:
            taus.append(risk_controlled_threshold(conf[remaining, k], agreed[remaining, k], eps))
            remaining &= ~(conf[:, k] >= taus[-1])
        total = 0.0
        for i in range(len(x)):
            spent = 0.0
            for stage in range(3):
                spent += plain[stage] + (head[stage] if stage in kept else 0.0)
                if stage in kept and conf[i, stage] >= taus[kept.index(stage)]:
                    break
            else:
                spent += final
            total += spent
        return total / len(x)

    prices = {kept: price(kept) for n in range(4) for kept in itertools.combinations(range(3), n)}
    best = min(prices, key=prices.get)
    assert manifest.exits == list(best), prices
    assert manifest.placement["expected_s"] == pytest.approx(prices[best])
    assert [s.stop for s in manifest.segments] == [k + 1 for k in best] + [4]


# --- the command line ------------------------------------------------------------------------------------------


def test_profile_and_inspect_a_classifier(tmp_path, calibrated):
    import json

    from typer.testing import CliRunner

    from eec.cli.main import app

    model, _ = calibrated
    x = calibration_set(300, seed=4)
    y = np.random.default_rng(5).integers(0, 3, len(x))
    np.savez(tmp_path / "test.npz", x=x, y=y)
    result = CliRunner().invoke(app, ["profile", str(model.root), "--data", str(tmp_path / "test.npz"), "--eps",
                                      "0.8,0.9", "--batch", "1,7", "--rounds", "1", "--metric", "max-prob",
                                      "--json", str(tmp_path / "rows.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["epsilon"] for r in rows] == [None, 0.8, 0.9]
    full = x[:, 3].argmax(-1)
    for row in rows:
        taus = [math.inf] * 3 if row["epsilon"] is None else model.thresholds_for(row["epsilon"], "max-prob")
        exits, labels = np.full(len(x), 3), full.copy()
        for i in range(len(x)):  # by hand: the first exit whose top probability reaches its threshold
            for k in range(3):
                if x[i, k].max() >= taus[k]:
                    exits[i], labels[i] = k, x[i, k].argmax()
                    break
        assert row["agreement"] == pytest.approx((labels == full).mean())
        assert row["accuracy"] == pytest.approx((labels == y).mean())
        assert {int(k): v for k, v in row["exits"].items()} == {int(k): int((exits == k).sum()) for k in np.unique(exits)}
        assert set(row["samples_per_s"]) == {"1", "7"} and all(v > 0 for v in row["samples_per_s"].values())
    shown = CliRunner().invoke(app, ["inspect", str(model.root)])
    assert shown.exit_code == 0 and "exits after stages: 0, 1, 2" in shown.output
    assert "calibrated on 1000 labeled samples, metric" in shown.output
    refused = CliRunner().invoke(app, ["generate", str(model.root), "hello"])
    assert refused.exit_code == 1 and "is a classifier artifact" in refused.stderr


def test_compile_on_the_command_line(tmp_path, compiled):
    from typer.testing import CliRunner

    from eec.cli.main import app

    net, art = compiled["mlp"]
    result = CliRunner().invoke(app, ["compile", str(art.with_suffix(".pt")), "-o", str(tmp_path / "m.eec"), "--data",
                                      str(art.with_suffix(".npz")), "--exits", "0"])
    assert result.exit_code == 0, result.output
    assert "exits after stages [0]" in result.stderr and "calibrated on 200 samples" in result.stderr
    model = load(tmp_path / "m.eec")
    cal = model.manifest.calibration  # unlabeled data, no --criterion or --rule: agreement, one threshold
    assert (cal.labeled, cal.criterion, cal.rule) == (False, "agreement", "joint")
    x = inputs(net, 5, seed=8)
    np.testing.assert_allclose(model.classify(x, mode="full").probs, torch_probs(net, x)[2], atol=2e-5)


def test_classify_imports_no_torch(compiled):
    import subprocess
    import sys

    from tests.test_runtime_isolation import FORBIDDEN

    _, art = compiled["mlp"]
    code = ("import sys, numpy as np; from eec.runtime import load; "
            f"r = load({str(art)!r}).classify(np.zeros((3, 12), np.float32), epsilon=0.9); assert len(r.labels) == 3; "
            f"print(' '.join(m for m in {FORBIDDEN!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"classify imported {out.stdout.strip()}"


def test_recalibrate_on_new_inputs(tmp_path, calibrated):
    import shutil

    from typer.testing import CliRunner

    from eec.calib.thresholds import risk_controlled_threshold
    from eec.cli.main import app

    model, _ = calibrated
    art = tmp_path / "known.eec"
    shutil.copytree(model.root, art)
    x = calibration_set(700, seed=11)
    np.savez(tmp_path / "new.npz", x=x)  # no labels this time
    refused = CliRunner().invoke(app, ["calibrate", str(art), "--data", str(tmp_path / "new.npz")])
    assert refused.exit_code == 1 and "ε is accuracy against labels" in refused.stderr  # compiled on labeled data
    assert load(art).manifest.calibration.samples == 1000  # nothing written
    for flags, message in [(["--criterion", "accuracy"], "needs labels"), (["--rule", "best"], "unknown threshold rule"),
                           (["--criterion", "labels"], "unknown criterion")]:
        bad = CliRunner().invoke(app, ["calibrate", str(art), "--data", str(tmp_path / "new.npz"), *flags])
        assert bad.exit_code == 1 and message in bad.stderr and "Traceback" not in bad.output, (flags, bad.output)
    assert load(art).manifest.calibration.samples == 1000
    result = CliRunner().invoke(app, ["calibrate", str(art), "--data", str(tmp_path / "new.npz"), "--metric", "max-prob",
                                      "--criterion", "agreement", "--rule", "risk"])
    assert result.exit_code == 0, result.output
    assert "calibrated on 700 samples, metric max-prob" in result.stderr and "accuracy" not in result.stderr
    again = load(art)
    assert again.manifest.calibration.samples == 700 and not again.manifest.calibration.labeled
    # the thresholds are the cascade over the new set, computed here from the inputs (each exit's probabilities)
    conf, answer = x[:, :3].max(-1), x.argmax(-1)
    remaining, want = np.ones(len(x), bool), []
    for k in range(3):
        want.append(risk_controlled_threshold(conf[remaining, k], (answer[:, k] == answer[:, 3])[remaining], 0.9))
        remaining &= ~(conf[:, k] >= want[-1])
    assert (again.manifest.calibration.criterion, again.manifest.calibration.rule) == ("agreement", "risk")
    assert again.thresholds_for(0.9, "max-prob") == pytest.approx(want)  # the new meaning is the default
    assert model.thresholds_for(0.9, "max-prob", rule="risk") != pytest.approx(want)  # the old set gave others


def test_patience_confidence_needs_two_confident_exits_in_a_row(known):
    # each sample's top probability at exits 0, 1, 2 (the final classifier last, unused)
    tops = {"a": [0.9, 0.9, 0.5], "b": [0.9, 0.5, 0.9], "c": [0.5, 0.9, 0.9], "d": [0.95, 0.5, 0.5]}
    x = np.stack([np.stack([one_hot_ish([0], top=t)[0] for t in [*row, 0.5]]) for row in tops.values()])
    got = known.classify(x.astype(np.float32), thresholds=[0.8, 0.8, 0.8], metric="patience-confidence")
    # a: confident at 0 and 1 -> leaves at 1; b: never twice in a row before the end; c: at 1 and 2 -> 2;
    # d: once only, and never at the first exit however confident
    assert got.exits.tolist() == [1, 3, 2, 3]
