"""`eec serve` on loopback, driven by the OpenAI Python client: the tokens it answers are the ones the
runtime gives for the same request (the runtime's own batched results are checked against transformers
elsewhere), streamed or not; bad requests are 400s, overload is 429, a client gone frees its row."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from eec.compiler import compile_model  # noqa: E402
from eec.runtime import load  # noqa: E402
from eec.serve.app import create_app  # noqa: E402
from tests.test_text import text_model_dir  # noqa: E402

PROMPTS = ["Le café près de la gare", "Über den Fluß", "東京の駅は", "def parse(line):"]


class Server:
    """uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny Llama with a byte-level BPE and a chat template, exits at 2 and 4, and the verify graph
    (so the server checks exits live), calibrated on a few prompts."""
    root = tmp_path_factory.mktemp("serve")
    text_model_dir(root / "hf", seed=7)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 3))
    compile_model(root / "hf", root / "s.eec", exits=[2, 4], speculative="on", calibration_prompts=prompts,
                  calibration_tokens=16)
    return root / "s.eec"


@pytest.fixture(scope="module")
def model(artifact):
    return load(artifact)


@pytest.fixture(scope="module")
def server(artifact):
    s = Server(create_app(artifact, name="tiny", max_batch=4, max_queue=64))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_completions_are_the_runtimes_tokens(client, model):
    """Greedy, early exit at the default ε and in full mode, and seeded sampling: the runtime's tokens,
    exits and text for the same prompt (not wrapped in the chat template)."""
    for options, extra in [(dict(temperature=0), {}), (dict(temperature=0), {"mode": "full"}),
                           (dict(temperature=0.8, seed=11, top_p=0.9), {}), (dict(temperature=0), {"epsilon": 0.5})]:
        out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, extra_body=extra, **options)
        ref = model.generate(PROMPTS[0], chat=False, max_new_tokens=12, mode=extra.get("mode", "early-exit"),
                             epsilon=extra.get("epsilon"), **options)
        choice = out.choices[0]
        assert choice.model_extra["token_ids"] == ref.tokens
        assert choice.model_extra["exits"] == ref.exits
        assert choice.text == ref.text and choice.finish_reason == ref.finish_reason
        assert out.usage.prompt_tokens == len(model.encode(PROMPTS[0], chat=False))
        assert out.usage.completion_tokens == len(ref.tokens)
    assert set(ref.exits) != {model.manifest.model.num_layers}, "no token left early: the exits went unchecked"


def test_chat_streamed_and_not(client, model):
    messages = [{"role": "system", "content": "Réponds."}, {"role": "user", "content": "Où est la gare?"}]
    ref = model.generate(model.encode_chat(messages), max_new_tokens=20, temperature=0)
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    assert out.choices[0].model_extra["token_ids"] == ref.tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
    exits = [e for c in chunks if c.choices for e in c.choices[0].model_extra.get("exits") or []]
    assert text == ref.text and tokens == ref.tokens and exits == ref.exits
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref.tokens)


def test_several_prompts_and_concurrent_clients(client, model, server):
    """A list of prompts is one choice each; 12 clients at once (three times the batch) each get their
    own tokens, with a stop string."""
    ids = [model.encode(p, chat=False) for p in PROMPTS]
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    refs = model.generate(ids, max_new_tokens=10, temperature=0)
    assert [c.model_extra["token_ids"] for c in sorted(out.choices, key=lambda c: c.index)] == [r.tokens for r in refs]

    free = model.generate(PROMPTS[1], chat=False, max_new_tokens=16, ignore_eos=True, temperature=0)
    stop = free.text[6:8]
    jobs = [(p, dict(max_tokens=8 + i, temperature=0, stop=[stop] if i % 3 == 0 else None))
            for i, p in enumerate(PROMPTS * 3)]
    answers: dict[int, object] = {}

    def ask(i):
        p, o = jobs[i]
        answers[i] = client.completions.create(model="tiny", prompt=p, stream=(i % 2 == 1), **o)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (p, o) in enumerate(jobs):
        ref = model.generate(p, chat=False, max_new_tokens=o["max_tokens"], temperature=0, stop=o["stop"])
        if i % 2:
            chunks = list(answers[i])
            assert "".join(c.choices[0].text for c in chunks) == ref.text
            assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == ref.tokens
        else:
            assert answers[i].choices[0].text == ref.text
            assert answers[i].choices[0].model_extra["token_ids"] == ref.tokens


@pytest.mark.parametrize("body, message", [
    ({"prompt": ""}, "empty"),
    ({"prompt": [1, 2, 100000]}, "token ids must be in"),
    ({"prompt": "x", "max_tokens": -1}, "max_new_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "n": 2}, "n must be 1"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "epsilon": "high"}, "epsilon"),
    ({"prompt": "x" * 5000}, "context"),
    ({"max_tokens": 3}, "prompt"),
])
def test_bad_requests_are_400s_with_a_message(server, body, message):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert "\n" not in error["message"]


def test_chat_bad_requests(server):
    for body, message in [({"messages": []}, "messages"), ({"messages": [{"role": "user"}], "tools": [{}]}, "tools"),
                          ({"messages": [{"role": "pirate", "content": "x"}]}, "role")]:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_health_models_and_metrics(server, client):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list()] == ["tiny"]
    before = _metrics(server)
    out = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=9, temperature=0)
    after = _metrics(server)
    exits = out.choices[0].model_extra["exits"]
    assert after["eec_generated_tokens_total"] - before.get("eec_generated_tokens_total", 0) == len(exits)
    for layer in set(exits):
        key = f'eec_token_exits_total{{layer="{layer}"}}'
        assert after[key] - before.get(key, 0) == exits.count(layer)
    key = 'eec_requests_total{code="200",endpoint="/v1/completions"}'
    assert after[key] - before.get(key, 0) == 1
    assert after["eec_queue_depth"] == 0
    assert after["eec_monitor_checked_tokens_total"] >= after["eec_monitor_agreed_tokens_total"]
    assert after["eec_monitor_checked_tokens_total"] > 0, "the monitor judged no exited token"


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_a_client_gone_mid_stream_frees_its_row(server):
    engine = server.app.state.service.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.03), step())[1]  # the ~110 tokens left in the context take 3 s
    try:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                          json={"prompt": PROMPTS[0], "max_tokens": 2000, "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            got = [json.loads(line[6:]) for line in (next(lines) for _ in range(6)) if line.startswith("data: {")]
            assert got and engine.live == 1
            request = engine.slots[0]
        deadline = time.monotonic() + 10
        while engine.live and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.step = step
    assert engine.live == 0 and engine.waiting == 0 and not server.app.state.service.inflight
    assert request.finish_reason == "cancelled" and len(request.tokens) < 50


def test_a_full_queue_answers_429(artifact):
    """A queue of one while the engine is held between steps: the second request is refused with
    Retry-After, and the first still finishes once the engine moves on."""
    s = Server(create_app(artifact, max_batch=1, max_queue=1))
    engine = s.app.state.service.engine
    gate, step = threading.Event(), engine.step
    engine.step = lambda: (gate.wait(), step())[1]
    try:
        answers = []
        first = threading.Thread(target=lambda: answers.append(httpx.post(
            s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0}, timeout=60)))
        first.start()
        deadline = time.monotonic() + 10
        while engine.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "y", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "waiting" in r.json()["error"]["message"]
        gate.set()
        first.join(30)
        assert answers[0].status_code == 200 and len(answers[0].json()["choices"][0]["token_ids"]) == 2
    finally:
        gate.set()
        s.close()


def test_a_classifier_serves_classify(tmp_path):
    """A branched classifier artifact: /v1/classify answers what `classify` answers, completions are 404."""
    from eec.compiler import save_early_exit
    from eec.compiler.branched_pipeline import compile_branched
    from tests.test_branched import inputs, make

    torch = pytest.importorskip("torch")
    net = make("mlp")
    save_early_exit(net, torch.from_numpy(inputs(net, 4, seed=9)), tmp_path / "mlp.pt")
    np.savez(tmp_path / "cal.npz", x=inputs(net, 200, seed=2))
    compile_branched(tmp_path / "mlp.pt", tmp_path / "mlp.eec", data=tmp_path / "cal.npz")
    art = tmp_path / "mlp.eec"
    x = inputs(net, 16, seed=5)
    clf = load(art)
    s = Server(create_app(art, name="cnn", max_samples=256))
    try:
        r = httpx.post(s.url + "/v1/classify", json={"input": x.tolist(), "epsilon": 0.9}, timeout=60)
        assert r.status_code == 200, r.text
        ref = clf.classify(x, epsilon=0.9)
        data = r.json()["data"]
        assert [d["label"] for d in data] == ref.labels.tolist()
        assert [d["exit"] for d in data] == ref.exits.tolist()
        np.testing.assert_allclose([d["probability"] for d in data], ref.probs[np.arange(len(x)), ref.labels],
                                   rtol=1e-6)
        one = httpx.post(s.url + "/v1/classify", json={"input": x[0].tolist()}, timeout=60).json()["data"]
        assert len(one) == 1
        bad = httpx.post(s.url + "/v1/classify", json={"input": [[1, 2], [3]]}, timeout=60)
        assert bad.status_code == 400 and "array" in bad.json()["error"]["message"]
        unlabeled = httpx.post(s.url + "/v1/classify", json={"input": x.tolist(), "criterion": "accuracy"}, timeout=60)
        assert unlabeled.status_code == 400 and "labeled calibration" in unlabeled.json()["error"]["message"]
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "x"}).status_code == 404

        # Requests that arrive while the classifier runs are classified together in its next call: each
        # gets the answer it gets alone, and a bad one among them its own 400.
        gate, calls, classify = threading.Event(), [], clf.classify
        served = s.app.state.service.classifier

        def held(x, **options):
            calls.append(len(x))
            gate.wait(30)
            return classify(x, **options)

        served.classify = held
        answers = {}

        def ask(i, body):
            answers[i] = httpx.post(s.url + "/v1/classify", json=body, timeout=60)

        first = threading.Thread(target=ask, args=(0, {"input": x[:2].tolist(), "epsilon": 0.9}))
        first.start()
        while not calls:
            time.sleep(0.01)
        bodies = {i: {"input": x[2 * i: 2 * i + 3].tolist(), "epsilon": 0.9} for i in range(1, 5)}
        bodies[5] = {"input": [[1.0, 2.0]], "epsilon": 0.9}
        others = [threading.Thread(target=ask, args=(i, b)) for i, b in bodies.items()]
        for t in others:
            t.start()
        while len(s.app.state.service.waiting) < 4:
            time.sleep(0.01)
        gate.set()
        for t in [first, *others]:
            t.join(60)
        assert calls == [2, 12], calls  # the four good requests waited and ran as one call
        for i in range(1, 5):
            ref = classify(x[2 * i: 2 * i + 3], epsilon=0.9)
            got = answers[i].json()
            assert [d["label"] for d in got["data"]] == ref.labels.tolist()
            assert [d["exit"] for d in got["data"]] == ref.exits.tolist() and got["usage"]["batch"] == 12
        assert answers[5].status_code == 400 and "shape" in answers[5].json()["error"]["message"]
    finally:
        s.close()


def test_two_replicas_on_ray_serve_answer_as_the_runtime(artifact, model):
    """The scale-out deployment started locally: 2 replicas behind Ray Serve's proxy on loopback give
    the runtime's tokens, streamed and not, and both replicas answer."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from eec.serve.ray_app import deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(artifact, replicas=2, cpus=0.5, threads=1, max_batch=4), name="eec", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        pids = {httpx.get(url + "/health", timeout=30).json()["pid"] for _ in range(30)}
        assert len(pids) == 2, f"one replica answered every time: {pids}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        for i, prompt in enumerate(PROMPTS):
            ref = model.generate(prompt, chat=False, max_new_tokens=10, temperature=0)
            if i % 2:
                chunks = list(client.completions.create(model="s.eec", prompt=prompt, max_tokens=10, temperature=0,
                                                        stream=True))
                tokens = [t for c in chunks for t in c.choices[0].model_extra["token_ids"]]
                exits = [e for c in chunks for e in c.choices[0].model_extra["exits"]]
            else:
                out = client.completions.create(model="s.eec", prompt=prompt, max_tokens=10, temperature=0)
                tokens, exits = out.choices[0].model_extra["token_ids"], out.choices[0].model_extra["exits"]
            assert (tokens, exits) == (ref.tokens, ref.exits)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_throughput_window_forgets_old_marks(monkeypatch):
    """A server nobody scrapes keeps only the last window's marks (each token adds one)."""
    from eec.serve import metrics

    now = [0.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    rate = metrics.Rate(window=10)
    for _ in range(1000):
        rate.add(2)
        now[0] += 0.1
    assert len(rate.marks) <= 101
    assert rate() == pytest.approx(2 * 100 / 10, rel=0.02)
