"""The edge–cloud split: a device runs the segments up to an exit, an eec server the rest. The reference is
the whole artifact in one process: the split must decode its tokens and exits, alone and in a batch,
after the server loses its sessions, and fall back to the device's exit (flagged) when the server is
gone or slow."""

from __future__ import annotations

import socket
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")

from eec.errors import ArtifactError, InputError  # noqa: E402
from eec.runtime import load  # noqa: E402
from eec.runtime.engine import Engine  # noqa: E402
from eec.runtime.split import CONTENT_TYPE, TailRequest, encode  # noqa: E402
from eec.serve.app import create_app  # noqa: E402
from tests.reference import hf_greedy  # noqa: E402
from tests.test_batch import PROMPTS  # noqa: E402
from tests.test_serve import Server  # noqa: E402

OPTIONS = dict(thresholds=0.4, max_new_tokens=12)  # some tokens leave at 1 or 3, others go to the server


@pytest.fixture(scope="module")
def whole(llama_compiled):
    return load(llama_compiled.artifact)


@pytest.fixture(scope="module")
def server(llama_compiled):
    s = Server(create_app(llama_compiled.artifact, split=3, sessions=3))
    yield s
    s.close()


def key(results):
    return [(r.tokens, r.exits) for r in results]


def test_the_split_decodes_what_the_whole_artifact_decodes(llama_compiled, whole, server):
    device = load(llama_compiled.artifact, split=3, server=server.url)
    want = [whole.generate(p, **OPTIONS) for p in PROMPTS]
    alone = [device.generate(p, **OPTIONS) for p in PROMPTS]
    assert key(alone) == key(want)
    exits = {e for r in want for e in r.exits}
    assert exits & {1, 3} and exits - {1, 3}, f"no token {'left on the device' if exits - {1, 3} else 'went on'}"
    assert not any(r.fallbacks for r in alone)
    # five sequences at once on three server sessions: the least recently used are evicted and resent
    assert key(device.generate(PROMPTS, max_batch=5, **OPTIONS)) == key(want)
    full = [whole.generate(p, mode="full", max_new_tokens=8) for p in PROMPTS[:2]]
    assert key(device.generate(PROMPTS[:2], mode="full", max_new_tokens=8)) == key(full)
    sampled = dict(OPTIONS, temperature=0.9, seed=4)
    assert key([device.generate(PROMPTS[0], **sampled)]) == key([whole.generate(PROMPTS[0], **sampled)])


def test_a_server_that_lost_its_sessions_gets_them_again(llama_compiled, whole, server):
    """The server drops every session mid-generation (as a restart does): the device resends the
    positions from the start, and the tokens are still the whole artifact's."""
    device = load(llama_compiled.artifact, split=3, server=server.url)
    host = server.app.state.tail
    engine = Engine(device, max_batch=2)
    requests = [engine.submit(p, **OPTIONS) for p in PROMPTS[:2]]
    for _ in range(5):
        engine.step()
    assert set(engine.batch.sessions[:2]) <= set(host.slots), "the server has not seen both sequences yet"
    for session, slot in list(host.slots.items()):  # a restart: the server knows nobody
        host.batch.release(slot)
        host.free.append(slot)
        del host.slots[session]
    before = _count(server, "409")
    engine.run()
    assert key([r.result() for r in requests]) == key([whole.generate(p, **OPTIONS) for p in PROMPTS[:2]])
    assert _count(server, "409") > before, "the server never asked for its lost positions"


def _count(server, code: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f'eec_requests_total{{code="{code}",endpoint="/v1/tail"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_no_server_the_device_decides_and_flags_it(llama_compiled):
    """Nothing listens at the server's address. With no exit confident, every token comes from the
    device's last exit (layer 3, the model's own norm and head), flagged: transformers' greedy tokens
    of the model cut after layer 3. Tokens an exit is confident about are not flagged."""
    import copy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    device = load(llama_compiled.artifact, split=3, server=url, timeout=0.5)
    start = time.perf_counter()
    got = device.generate(PROMPTS[0], thresholds=np.inf, max_new_tokens=12)
    assert time.perf_counter() - start < 5, "a dead server stalled the device"
    cut = copy.deepcopy(llama_compiled.hf)
    cut.model.layers = cut.model.layers[:3]
    cut.config.num_hidden_layers = 3
    assert got.tokens == hf_greedy(cut, PROMPTS[0], 12)
    assert got.exits == [3] * 12 and got.fallbacks == list(range(12))
    mixed = device.generate(PROMPTS[0], **OPTIONS)
    assert 0 < len(mixed.fallbacks) < 12 and all(mixed.exits[i] == 3 for i in mixed.fallbacks)


def test_a_slow_server_times_out_into_a_fallback(llama_compiled, server):
    host = server.app.state.tail
    answer = host.answer_many
    host.answer_many = lambda *a: (time.sleep(1.0), answer(*a))[1]
    try:
        device = load(llama_compiled.artifact, split=3, server=server.url, timeout=0.3)
        got = device.generate(PROMPTS[2], **OPTIONS)
        assert got.fallbacks and all(got.exits[i] == 3 for i in got.fallbacks)
    finally:
        host.answer_many = answer


def test_bad_splits_and_bad_tail_requests(llama_compiled, server, tmp_path):
    with pytest.raises(InputError, match="exits are"):
        load(llama_compiled.artifact, split=2, server=server.url)
    with pytest.raises(InputError, match="both"):
        load(llama_compiled.artifact, split=3)
    with pytest.raises(InputError, match="http"):
        load(llama_compiled.artifact, split=3, server="ftp://x").generate([1, 2], max_new_tokens=2)
    with pytest.raises(InputError, match="speculative|split"):
        load(llama_compiled.artifact, split=3, server=server.url).generate([1, 2], mode="speculative")
    hidden = np.zeros((2, 32), np.float32)
    for body, message in [(b"junk", "header"), (encode(TailRequest("s", 0, 2, 32, "not-this-artifact"), hidden),
                                                 "another artifact"),
                          (encode(TailRequest("s", 0, 3, 32, "x"), hidden), "payload")]:
        r = httpx.post(server.url + "/v1/tail", content=body, headers={"content-type": CONTENT_TYPE})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    # A device holding another artifact is told so in one line rather than falling back silently.
    import shutil

    other = tmp_path / "other.eec"
    shutil.copytree(llama_compiled.artifact, other)
    manifest = other / "manifest.json"
    manifest.write_text(manifest.read_text() + "\n")  # the same model, but not the server's manifest
    device = load(other, split=3, server=server.url)
    with pytest.raises(ArtifactError, match="another artifact"):
        device.generate(PROMPTS[0], mode="full", max_new_tokens=3)


def test_parts_written_by_eec_split_hold_their_own_layers_and_decode_as_the_whole(llama_compiled, whole, server,
                                                                                 tmp_path):
    """`eec split` writes a device part with no server layer in it and a server part with no embedding;
    served and loaded, they decode the whole artifact's tokens; the device part also works against a
    server running the whole artifact with --split (the same fingerprint)."""
    from typer.testing import CliRunner

    from eec.cli.main import app
    from eec.runtime.manifest import read_manifest

    dev, srv = tmp_path / "d.eec", tmp_path / "s.eec"
    out = CliRunner().invoke(app, ["split", str(llama_compiled.artifact), "--at", "3", "--device", str(dev),
                                   "--server", str(srv)])
    assert out.exit_code == 0, out.output
    whole_manifest, device_manifest = read_manifest(llama_compiled.artifact), read_manifest(dev)
    later = {f for s in whole_manifest.segments if s.start >= 3 for f in s.graphs.values()}
    assert later and not later & set(device_manifest.files)
    weights = "graphs/weights.data"
    assert (dev / weights).stat().st_size < 0.6 * (llama_compiled.artifact / weights).stat().st_size
    assert read_manifest(srv).tokenizer is None and not read_manifest(srv).segments[0].takes_ids

    part_server = Server(create_app(srv, sessions=4))
    try:
        want = key([whole.generate(p, **OPTIONS) for p in PROMPTS])
        assert key(load(dev, server=part_server.url).generate(PROMPTS, **OPTIONS)) == want
        assert key(load(dev, server=server.url).generate(PROMPTS[:2], **OPTIONS)) == want[:2]
        assert httpx.post(part_server.url + "/v1/completions", json={"prompt": [1]}).status_code == 404
    finally:
        part_server.close()
    shown = {part: CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "250"})
             for part, path in (("device", dev), ("server", srv))}
    n = whole_manifest.model.num_layers
    assert f"the device part of a split at layer 3: layers 0-3 here, 3-{n} on the server" in shown["device"].stdout
    assert f"the server part of a split at layer 3: layers 3-{n} here" in shown["server"].stdout
    assert "calibrated on" in shown["device"].stdout and "calibrate" not in shown["server"].stdout
    with pytest.raises(InputError, match="server's URL"):
        load(dev)
    with pytest.raises(InputError, match="server part"):
        load(srv).generate([1, 2], max_new_tokens=2)
    refused = CliRunner().invoke(app, ["split", str(llama_compiled.artifact), "--at", "2", "--device",
                                       str(tmp_path / "x.eec"), "--server", str(tmp_path / "y.eec")])
    assert refused.exit_code == 1 and "exits are [1, 3, 4]" in refused.output and "Traceback" not in refused.output
    (dev / "graphs" / "seg0.onnx").write_bytes((dev / "graphs" / "seg0.onnx").read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="sha256|modified|changed"):
        load(dev, server=server.url)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """The branched test ResNet (heads after stages 0, 1, 2 and the last), compiled and calibrated."""
    torch = pytest.importorskip("torch")
    from eec.compiler import save_early_exit
    from eec.compiler.branched_pipeline import compile_branched
    from tests.test_branched import inputs, make

    root = tmp_path_factory.mktemp("split-cnn")
    net = make("resnet")
    save_early_exit(net, torch.from_numpy(inputs(net, 4, seed=9)), root / "net.pt")
    np.savez(root / "cal.npz", x=inputs(net, 200, seed=2))
    compile_branched(root / "net.pt", root / "net.eec", data=root / "cal.npz")
    return root / "net.eec", inputs(net, 64, seed=6)


def test_a_classifier_split_answers_as_the_whole_network(cnn):
    """Device: stages 0-1 and their exits; server: the rest. Samples that stay after exit 1 get the
    server's answers, the ones the whole network gives; with no server, exit 1's, flagged."""
    path, x = cnn
    whole_clf = load(path)
    # each exit's median top probability: about half the samples leave at each exit
    taus = []
    for k in range(3):
        only = [np.inf] * 3
        only[k] = -np.inf
        taus.append(float(np.median(whole_clf.classify(x, thresholds=only, metric="max-prob").probs.max(-1))))
    s = Server(create_app(path, split=1))
    try:
        device = load(path, split=1, server=s.url)
        for options in (dict(thresholds=taus, metric="max-prob"), dict(thresholds=taus, metric="top2-margin"),
                        dict(mode="full")):
            want, got = whole_clf.classify(x, **options), device.classify(x, **options)
            assert got.labels.tolist() == want.labels.tolist() and got.exits.tolist() == want.exits.tolist()
            np.testing.assert_allclose(got.probs, want.probs, rtol=1e-5, atol=1e-6)
            assert not got.fallback.any()
        assert set(want.exits.tolist()) == {3}
        mixed = whole_clf.classify(x, thresholds=taus, metric="max-prob").exits
        assert (mixed <= 1).any() and (mixed == 2).any() and (mixed == 3).any(), mixed
        with pytest.raises(InputError, match="carries state"):
            device.classify(x, metric="patience", thresholds=[2, 2, 2])
        bad = httpx.post(s.url + "/v1/classify/tail", content=b"\x05\x00\x00\x00{}{}{", headers={
            "content-type": CONTENT_TYPE})
        assert bad.status_code == 400
    finally:
        s.close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    alone = load(path, split=1, server=dead, timeout=0.5).classify(x, thresholds=taus, metric="max-prob")
    exit1 = whole_clf.classify(x, thresholds=[taus[0], -np.inf, np.inf], metric="max-prob")
    assert alone.labels.tolist() == exit1.labels.tolist() and alone.exits.tolist() == exit1.exits.tolist()
    confident = whole_clf.classify(x, thresholds=[*taus[:2], np.inf], metric="max-prob").exits <= 1
    assert alone.fallback.tolist() == (~confident).tolist() and alone.fallback.any()


def test_devices_asking_at_once_share_the_servers_steps(llama_compiled, whole, server):
    """Four devices decoding at the same time: requests that wait while a step runs go together in the
    next one (rows of one position share a call), and each device still gets the whole artifact's tokens."""
    import threading

    host = server.app.state.tail
    gate, answer = threading.Event(), host.answer_many

    def held(asked):
        gate.wait(30)
        return answer(asked)

    host.answer_many = held
    steps, rows = host.steps, host.rows
    devices = [load(llama_compiled.artifact, split=3, server=server.url, timeout=30) for _ in range(4)]
    got: dict[int, object] = {}
    threads = [threading.Thread(target=lambda k: got.__setitem__(k, devices[k].generate(PROMPTS[k], **OPTIONS)),
                                args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)  # the first request holds the worker; the others wait for the next step
        gate.set()
        for t in threads:
            t.join(60)
    finally:
        host.answer_many = answer
        gate.set()
    assert key([got[k] for k in range(4)]) == key([whole.generate(p, **OPTIONS) for p in PROMPTS[:4]])
    assert host.rows - rows > host.steps - steps, "no step held two devices' rows"
