"""Targets end to end: --exits auto on a compiled tiny model, measured profiles, and the CLI's errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eec.cli.main import app
from eec.compiler import compile_model
from eec.errors import InputError
from eec.runtime import load
from eec.compiler.frontends import load_source
from eec.compiler.pipeline import model_shape
from eec.targets.latency import LatencyTable
from eec.targets.placement import Candidate
from eec.calib.traces import ALL_METRICS, thresholds_for
from eec.targets import measure
from eec.targets.measure import measure_artifact, measure_artifacts

runner = CliRunner()


@pytest.fixture(scope="module")
def measured(llama_src):
    """An artifact with exits at every candidate (1..5) and its measured profile."""
    art = llama_src / "all.eec"
    compile_model(llama_src / "hf", art, exits=[1, 2, 3, 4, 5], calibrate=False)
    table = measure_artifact(art, past=16, repeats=3)
    path = llama_src / "profile.json"
    path.write_text(table.to_json())
    return art, path, table


def test_measured_profile_covers_every_segment_and_head(measured):
    art, path, table = measured
    assert sorted(table.segments) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert all(len(v) == 8 and all(t > 0 for t in v) for v in table.segments.values())
    assert sorted(table.heads) == [1, 2, 3, 4, 5]
    assert 0 < table.call_overhead < min(min(v) for v in table.segments.values())
    again = LatencyTable.from_json(path.read_text())
    assert again.segments == table.segments and again.shape == table.shape
    # Each exit segment is also timed with its head inside (fused by default at this size), as early exit runs it.
    assert sorted(table.with_head) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)] and again.with_head == table.with_head
    assert all(t > 0 for t in table.with_head.values())
    earlier = json.loads(path.read_text())  # a profile written when the field was called "fused"
    earlier["fused"] = earlier.pop("with_head")
    assert LatencyTable.from_json(json.dumps(earlier)).with_head == table.with_head
    # A range spanning several measured segments saves the calls it merges.
    assert table.range_cost(0, 2) == pytest.approx(sum(table.segments[p][0] for p in [(0, 1), (1, 2)]) - table.call_overhead)
    # eec's own work in a decode step, around the calls: the runtime's step timed in full mode and with
    # every exit asked, for one row (this artifact: 6 segment calls a step, 5 exits).
    [(rows, segments, exits, full, asked)] = table.host_samples
    assert (rows, segments, exits) == (1, 6, 5) and 0 < full and 0 < asked
    assert again.host_samples == table.host_samples
    # more steps asked for than the context holds (128 positions): as many as fit
    assert all(t > 0 for t in measure._host_times(art, 2, 100, np.random.default_rng(0)))


def test_measure_times_both_kv_layouts(tiny_compiled, measured):
    """Shared KV buffers (GroupQueryAttention) and concatenated presents (plain ops, head size 8) both time."""
    table = measure_artifact(tiny_compiled.artifact, past=16, repeats=2)
    assert sorted(table.segments) == [(0, 2), (2, 4), (4, 6)]
    assert all(len(v) == 8 and all(t > 0 for t in v) for v in table.segments.values())
    # One profile holds one model: artifacts of another shape are refused, of the same one merged.
    art, _, reference = measured
    if table.shape != reference.shape:
        with pytest.raises(InputError, match="another model"):
            measure_artifacts([art, tiny_compiled.artifact], past=16, repeats=2)
    else:
        merged = measure_artifacts([art, tiny_compiled.artifact], past=16, repeats=2)
        assert {(0, 1), (0, 2), (2, 4)} <= set(merged.segments)


def test_exits_auto_records_and_builds_the_chosen_set(llama_src, measured):
    _, profile, _ = measured
    out = llama_src / "auto.eec"
    manifest = compile_model(llama_src / "hf", out, exits="auto", placement_eps=0.8, profile=profile, calibration_tokens=8,
                             candidates="all", placement_batch=4)
    placement = manifest.placement
    assert manifest.exits == placement["exits"]
    assert placement["batch"] == 4 and "4 sequences at once" in placement["report"][0]  # priced for a batch of 4
    assert placement["candidates"] == [1, 2, 3, 4, 5]  # every layer, not the quarter depths
    assert set(placement["exits"]) <= set(placement["candidates"])
    assert placement["ranked"][0]["exits"] == placement["exits"]
    speedups = [r["predicted_speedup"] for r in placement["ranked"]]
    assert speedups[1:] == sorted(speedups[1:], reverse=True)  # the chosen set first, then the others by speed
    assert speedups[0] >= max(speedups) / 1.02 - 1e-4  # the chosen set is within placement's tolerance
    model = load(out)
    assert model.exits == placement["exits"]
    result = model.generate([3, 17, 42], max_new_tokens=8, epsilon=0.8)
    from transformers import AutoModelForCausalLM
    from tests.test_early_exit import check_tokens_against_transformers

    hf = AutoModelForCausalLM.from_pretrained(llama_src / "hf").eval()
    check_tokens_against_transformers(hf, [3, 17, 42], result.tokens, result.exits)


# Hand-priced profile for the tests below: no timing, so the chosen set cannot change with the machine.
# Every one-layer segment costs LAYER + SLOPE per extra position; a head HEAD over the whole vocabulary;
# no fixed cost per call, so a range costs the sum of its layers and a shortlist scales the whole head.
LAYER, SLOPE, HEAD = 1e-3, 1e-4, 4e-4


@pytest.fixture(scope="module")
def hand_priced(llama_src):
    shape = model_shape(load_source(llama_src / "hf"))
    layers = shape.num_layers
    table = LatencyTable(shape, "fp32", "cpu", "measured", call_overhead=0.0,
                         segments={(i, i + 1): [LAYER + SLOPE * s for s in range(8)] for i in range(layers)},
                         heads={i: HEAD for i in range(1, layers)})
    profile = llama_src / "hand-priced.json"
    profile.write_text(table.to_json())
    return profile


def hand_price(exits: list[int], taken: dict[int, int], layers: int, head: float) -> float:
    """Mean seconds per token, written out for the hand-priced profile: a token leaving at exit e runs e
    layers and the heads of the exits up to e, and each later layer runs its position once more (one
    more position in the next deep token's call: SLOPE); a deep token runs every layer and every head."""
    total = 0.0
    for layer, count in taken.items():
        heads = sum(1 for e in exits if e <= layer) * head
        catch_up = (layers - layer) * SLOPE
        total += count * (layer * LAYER + heads + catch_up)
    return total / sum(taken.values())


def test_exits_auto_prices_the_built_artifact_on_its_own_traces(llama_src, hand_priced):
    out = llama_src / "built.eec"
    # ε 0.2: several exits of the random tiny model certify with a margin, so the search keeps one.
    manifest = compile_model(llama_src / "hf", out, exits="auto", placement_eps=0.2, profile=hand_priced,
                             calibration_tokens=8, candidates="all", shortlist=24)
    placement = manifest.placement
    assert placement["exits"] and placement["shortlist"] == 24  # a list: rebuilt, so priced again
    assert "search_predicted_speedup" in placement and "built: on its own traces" in placement["report"][-1]
    # Recomputed here: the built artifact's shipped traces replayed by hand at its thresholds for ε 0.2,
    # then priced by hand with the shortlist's share of each head (24 of 96 tokens).
    model = load(out)
    traces, exits, layers = model.traces, manifest.exits, manifest.model.num_layers
    taus = thresholds_for(traces.columns(exits), 0.2, manifest.calibration.metric, "risk", 0.1)
    scores = traces.columns(exits).scores[:, :, ALL_METRICS.index(manifest.calibration.metric)]
    taken = {layer: 0 for layer in [*exits, layers]}
    for row in scores:
        leave = next((e for e, s in zip(exits, row) if s >= taus[e]), layers)
        taken[leave] += 1
    assert sum(taken[e] for e in exits) > 0  # some token leaves early, or nothing was priced
    want = layers * LAYER / hand_price(exits, taken, layers, HEAD * 24 / 96)
    assert placement["predicted_speedup"] == pytest.approx(want, rel=1e-3)
    assert str(dict(sorted(taken.items()))) in placement["report"][-1]


def test_exits_auto_writes_the_full_model_when_the_built_set_would_be_slower(llama_src, hand_priced, monkeypatch):
    import eec.compiler.pipeline as pipeline

    priced = []

    def slower(traces, table, exits, *args, **kwargs):
        priced.append(exits)
        return Candidate(exits, 1.0, 0.9, 0.5, 0.9, {})

    monkeypatch.setattr(pipeline, "evaluate", slower)  # what the built artifact's traces would say
    manifest = compile_model(llama_src / "hf", llama_src / "slow.eec", exits="auto", placement_eps=0.2,
                             profile=hand_priced, calibration_tokens=8, candidates="all", shortlist=24)
    assert priced and priced[0]  # the chosen set was priced once built
    assert manifest.exits == [] and len(manifest.segments) == 1 and manifest.placement["exits"] == []
    assert "no exit pays here once built" in manifest.placement["report"][-1]


def test_bad_target_inputs(llama_src, measured, tmp_path):
    _, profile, _ = measured
    with pytest.raises(InputError, match="known targets: cpu, cuda, jetson-orin-agx"):
        compile_model(llama_src / "hf", tmp_path / "x.eec", target="tpu-v9")
    with pytest.raises(InputError, match="--exits auto needs calibration traces"):
        compile_model(llama_src / "hf", tmp_path / "x.eec", exits="auto", calibrate=False)
    with pytest.raises(InputError, match="use them with --exits auto"):
        compile_model(llama_src / "hf", tmp_path / "x.eec", exits=[2], candidates=[1, 2])
    other = json.loads(profile.read_text())
    other["shape"]["num_layers"] = 30
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(InputError, match="measured for another model"):
        compile_model(llama_src / "hf", tmp_path / "x.eec", exits="auto", profile=tmp_path / "other.json")
    assert not (tmp_path / "x.eec").exists()


def test_targets_cli(measured, tmp_path, monkeypatch):
    from eec.targets import measure as measuring
    from eec.targets.latency import fit_segment_overhead

    art, _, _ = measured
    listed = runner.invoke(app, ["targets", "list"])
    assert listed.exit_code == 0 and "jetson-orin-agx" in listed.output and "h100" in listed.output
    shown = runner.invoke(app, ["targets", "show", "rtx-4090"])
    assert shown.exit_code == 0 and "1008" in shown.output
    bad = runner.invoke(app, ["targets", "show", "nope"])
    assert bad.exit_code == 1 and "known targets" in bad.output
    whole = tmp_path / "whole.eec"
    compile_model(art.parent / "hf", whole, exits=[], calibrate=False)
    result = runner.invoke(app, ["targets", "measure", str(art), str(whole), "-o", str(tmp_path / "p.json"),
                                 "--repeats", "2", "--past", "16"])
    assert result.exit_code == 0, result.output
    merged = LatencyTable.from_json((tmp_path / "p.json").read_text())
    assert (0, 6) in merged.segments and (0, 1) in merged.segments and 1 in merged.heads
    # Fitted from the six one-layer calls against the one six-layer call (the fit is checked by hand in
    # test_placement); whether it is above 0 on a tiny model is the machine's, not a test's, to say.
    assert merged.segment_overhead == pytest.approx(fit_segment_overhead(merged.segments))
    assert "fixed cost per segment call" in result.output and "without exits too" not in result.output
    assert LatencyTable.from_json((tmp_path / "p.json").read_text()).source == "measured"
    # A fit that comes out at nothing is said as such, not as advice to measure what was measured.
    monkeypatch.setattr(measuring, "fit_segment_overhead", lambda segments: 0.0)
    result = runner.invoke(app, ["targets", "measure", str(art), str(whole), "-o", str(tmp_path / "q.json"),
                                 "--repeats", "1", "--past", "16"])
    assert result.exit_code == 0 and "no fixed cost per segment call measurable" in result.output, result.output
    alone = runner.invoke(app, ["targets", "measure", str(art), "-o", str(tmp_path / "r.json"), "--repeats", "1",
                                "--past", "16"])
    assert alone.exit_code == 0 and "measure an artifact without exits too" in alone.output, alone.output


def test_measure_times_a_batch_step_over_its_rows(measured, tmp_path, monkeypatch):
    """`--batch 3`: every segment's plain graph is also called over 3 rows of one position each, after
    ``past`` cached positions per row, and its time is kept beside the one-row times."""
    from eec.runtime.kv import SegmentKV

    art, _, _ = measured
    seen = []
    call = SegmentKV.call

    def recording(self, role, slots, x, counts=None):
        seen.append((self.spec.start, role, len(slots), x.shape[:2], tuple(int(n) for n in self.lengths)))
        return call(self, role, slots, x, counts)

    monkeypatch.setattr(SegmentKV, "call", recording)
    # the host work's timing runs the runtime's own steps (timed in test_measured_profile...): its calls are not these
    monkeypatch.setattr(measure, "_host_times", lambda root, rows, repeats, rng: (60e-6 * rows, 60e-6 * rows + 5e-6))
    result = runner.invoke(app, ["targets", "measure", str(art), "-o", str(tmp_path / "p.json"), "--repeats", "2",
                                 "--past", "8", "--batch", "3"])
    assert result.exit_code == 0, result.output
    table = LatencyTable.from_json((tmp_path / "p.json").read_text())
    assert sorted(table.rows) == sorted(table.segments) and all(set(v) == {3} and v[3] > 0 for v in table.rows.values())
    batched = [c for c in seen if c[2] == 3]
    assert {c[0] for c in batched} == {a for a, _ in table.segments}  # every segment, over 3 rows at a time
    assert all(role == "plain" and shape == (3, 1) and lengths == (8, 8, 8) for _, role, _, shape, lengths in batched)
    assert "over 3 sequences, one token each" in result.output
    # one artifact (6 calls a step, 5 exits): the host work all per call, each exit's decision apart
    assert sorted(table.host) == [1, 3]
    assert table.host[1] == pytest.approx([0.0, 10e-6, 1e-6]) and table.host[3] == pytest.approx([0.0, 30e-6, 1e-6])
    bad = runner.invoke(app, ["targets", "measure", str(art), "-o", str(tmp_path / "q.json"), "--batch", "0"])
    assert bad.exit_code == 1 and "--batch must be a whole number" in bad.output and not (tmp_path / "q.json").exists()


def test_profile_command(llama_compiled, tmp_path):
    json_out, png = tmp_path / "profile.json", tmp_path / "profile.png"
    result = runner.invoke(app, ["profile", str(llama_compiled.artifact), "--eps", "0.5,0.9", "--tokens", "12",
                                 "--rounds", "1", "--json", str(json_out), "--plot", str(png), "--draft-layer", "3"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = json.loads(json_out.read_text())
    assert [(r["mode"], r["epsilon"]) for r in rows] == [("full", None), ("early-exit", 0.5), ("early-exit", 0.9),
                                                        ("speculative", 0.95)]  # the artifact has a verify graph
    assert all(r["gb_per_s"] > 0 for r in rows)  # weight bytes a token reads, over its time
    rows, speculative = rows[:-1], rows[-1]
    assert speculative["agreement"] == 1.0  # lossless: its tokens are full mode's
    assert speculative["exits"] == {"6": 4 * 12} and 0 <= speculative["drafts_kept"] <= 1
    assert "speculative (drafts at 0.95)" in result.output
    # Its ideal prices the cycles it made: the drafts' segments and head, the verify in catch-up's place.
    assert speculative["ideal_speedup"] > 0 and all(speculative["cost_ms"][k] > 0 for k in ("segments", "catch_up"))
    assert 1 <= speculative["tokens_per_verify"] <= 6  # a cycle emits at least the full model's token, at most max_draft
    assert speculative["gb_per_s"] > 0
    full = rows[0]
    assert full["agreement"] == 1.0 and full["speedup"] == 1.0 and full["exits"] == {"6": 4 * 12}
    assert full["cost_ms"]["heads"] == 0 and full["cost_ms"]["catch_up"] == 0 and full["cost_ms"]["segments"] > 0
    for r in rows[1:]:
        assert sum(r["exits"].values()) == 4 * 12  # 4 default prompts x 12 tokens, each counted once
        assert r["ideal_speedup"] > 0 and r["gb_per_s"] > 0
        want = teacher_forced_agreement(llama_compiled, r["epsilon"], 12)
        assert r["agreement"] == pytest.approx(want, abs=1e-9), (r["epsilon"], want)
    assert rows[1]["agreement"] < 1.0, "ε = 0.5 lets tokens leave that the full model would not emit"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batch_profile_counts_every_rows_tokens_against_full_mode_at_that_batch(llama_compiled, monkeypatch):
    """A clock where a step costs 1 ms in full mode and 0.5 ms early (whatever the rows): tok/s at b rows is
    b x 1000 and 2000, the speedup 2.0 at every batch; one row's tokens only, or full mode of another
    batch as the base, would be off by the batch size."""
    from types import SimpleNamespace

    from eec.targets import profiling

    model = load(llama_compiled.artifact)
    clock, real = [0.0], model.generate

    def stepped(prompts, **kwargs):
        results = real(prompts, **kwargs)
        assert kwargs.get("max_batch", len(prompts)) == len(prompts)  # the warm-up leaves it out
        steps = max(len(r.tokens) for r in results)  # the rows decode together, a step each token
        clock[0] += steps * (1e-3 if kwargs.get("mode") == "full" else 0.5e-3)
        return results

    monkeypatch.setattr(model, "generate", stepped)
    monkeypatch.setattr(profiling, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    rows = profiling.profile_batches(model, prompts, [0.9], [1, 2, 5], tokens=6, rounds=2)
    assert [(r.batch, r.epsilon) for r in rows] == [(b, e) for b in (1, 2, 5) for e in (None, 0.9)]
    for r in rows:
        assert r.tokens_per_s == pytest.approx(r.batch * (1000 if r.epsilon is None else 2000))
        assert r.speedup == pytest.approx(1.0 if r.epsilon is None else 2.0)


def test_profile_at_batch_sizes_and_of_an_artifact_without_exits(llama_compiled, llama_src, tmp_path):
    json_out = tmp_path / "p.json"
    result = runner.invoke(app, ["profile", str(llama_compiled.artifact), "--eps", "0.9", "--tokens", "6", "--rounds",
                                 "1", "--batch", "1,3", "--no-speculative", "--json", str(json_out)],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    batch = [r for r in json.loads(json_out.read_text()) if r["mode"] == "batch"]
    assert [(r["batch"], r["epsilon"]) for r in batch] == [(1, None), (1, 0.9), (3, None), (3, 0.9)]
    assert all(r["tokens_per_s"] > 0 for r in batch) and [r["speedup"] for r in batch][::2] == [1.0, 1.0]
    assert "tok/s at 3" in result.stdout and "speedup at 3" in result.stdout
    # `--exits auto` writes the full model alone where no exit pays: profiled in full mode, not refused as
    # uncalibrated (it has nothing to calibrate).
    full = tmp_path / "full.eec"
    compile_model(llama_src / "hf", full, exits=[], calibrate=False)
    result = runner.invoke(app, ["profile", str(full), "--tokens", "6", "--rounds", "1", "--json", str(json_out)])
    assert result.exit_code == 0, result.output
    assert [r["mode"] for r in json.loads(json_out.read_text())] == ["full"]
    assert "has no exits" in result.stderr and "nothing to choose between" in result.stdout
    assert "recommended" not in result.stdout  # no advice to keep exits that pay: it has none


def teacher_forced_agreement(compiled, eps: float, tokens: int) -> float:
    """What the profile must report as agreement at ``eps``, computed with transformers: on the default
    profile prompts, each of transformers' greedy tokens teacher-forced, the token of the first exit
    whose top-1 minus top-2 probability reaches its threshold (the model's own head on transformers'
    hidden state), else the final head's; the share equal to transformers' greedy token."""
    from eec.calib.calibrate import default_prompts
    from tests.reference import hf_forward, hf_greedy, rms_norm

    hf, model = compiled.hf, load(compiled.artifact)
    taus = model.thresholds_for(eps, "top2-margin")
    hits = count = 0
    for prompt in default_prompts(False, hf.config.vocab_size)[:4]:
        reference = hf_greedy(hf, prompt, tokens)
        out = hf_forward(hf, prompt + reference[:-1])
        for i, want in enumerate(reference):
            position = len(prompt) - 1 + i
            token = int(out.logits[0, position].argmax())
            for layer in (sorted(taus) if i > 0 else []):  # the prompt's pass runs every layer
                h = out.hidden_states[layer][0, position]
                p = torch.softmax(rms_norm(h, hf.model.norm.weight, hf.config.rms_norm_eps) @ hf.lm_head.weight.T, -1)
                top = torch.topk(p, 2).values
                if float(top[0] - top[1]) >= taus[layer]:
                    token = int(p.argmax())
                    break
            hits += token == want
            count += 1
    return hits / count


def test_profile_bad_input(llama_compiled, tmp_path):
    from tests.test_cli_errors import run_fails

    run_fails(["profile", llama_compiled.artifact, "--eps", "1.5"], "--eps must be numbers between 0 and 1", "1.5")
    run_fails(["profile", llama_compiled.artifact, "--json", tmp_path / "no" / "x.json"],
              f"output folder {tmp_path / 'no'} does not exist")
    run_fails(["profile", llama_compiled.artifact, "--tokens", "1"], "--tokens must be at least 2")


@pytest.mark.filterwarnings("ignore:Specified provider 'TensorrtExecutionProvider'")
def test_a_listed_tensorrt_provider_that_cannot_open_a_session_is_not_available(monkeypatch):
    # onnxruntime-gpu lists TensorRT whether or not its libraries are installed (an H100 without them).
    import onnxruntime as ort

    from eec.runtime import sessions

    real = ort.get_available_providers()
    if sessions.TRT in real:
        pytest.skip("this onnxruntime lists TensorRT itself")
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: [sessions.TRT, *real])
    sessions.tensorrt_available.cache_clear()
    try:
        assert not sessions.tensorrt_available()
    finally:
        sessions.tensorrt_available.cache_clear()


def test_tensorrt_target_compiles_anywhere_and_build_engines_explains(llama_src, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from eec.runtime import sessions
    from eec.targets.engines import build_engines, tensorrt_available
    from tests.test_gpu_device import check_fp16_tokens

    out = tmp_path / "orin.eec"
    manifest = compile_model(llama_src / "hf", out, exits=[2, 4], target="jetson-orin-agx", calibration_tokens=8)
    assert (manifest.precision, manifest.target) == ("fp16", "jetson-orin-agx")
    ops = {n.op_type for n in __import__("onnx").load(out / manifest.segments[0].file, load_external_data=False).graph.node}
    assert "GroupQueryAttention" not in ops  # TensorRT reads standard ops only
    monkeypatch.setattr(sessions, "_SAID", set())
    capsys.readouterr()
    model = load(out)  # on the host CPU, and saying so once
    load(out)
    notices = [line for line in capsys.readouterr().err.splitlines() if "not TensorRT" in line]
    if not tensorrt_available():
        assert len(notices) == 1 and "jetson-orin-agx artifact running on cpu" in notices[0], notices
        with pytest.raises(InputError, match="device 'tensorrt' needs engines"):
            load(out, device="tensorrt")
        with pytest.raises(InputError, match="measured through its engines, on that device after `eec build-engines`"):
            measure_artifact(out, repeats=1)
    # The fp16 standard-ops graphs compute the model: every token transformers' fp32 token at its layer
    # but for near-ties that transformers' own fp16 run shows half precision can flip.
    hf = AutoModelForCausalLM.from_pretrained(llama_src / "hf").eval()
    prompt = [3, 17, 42]
    for kwargs in (dict(mode="full"), dict(thresholds=-math.inf)):
        result = model.generate(prompt, max_new_tokens=24, ignore_eos=True, **kwargs)
        check_fp16_tokens(hf, prompt, result.tokens, result.exits)
    cpu_art = tmp_path / "cpu.eec"
    compile_model(llama_src / "hf", cpu_art, exits=[2], calibrate=False)
    with pytest.raises(InputError, match="no engines to build"):
        build_engines(cpu_art)
    if tensorrt_available():
        pytest.skip("this machine has TensorRT: the engine build is checked by test_build_engines_on_device")
    result = runner.invoke(app, ["build-engines", str(out)])
    assert result.exit_code == 1
    assert not (out / "engines").exists()


@pytest.mark.skipif(not __import__("eec.targets.engines", fromlist=["x"]).tensorrt_available(),
                    reason="needs onnxruntime-gpu with TensorRT on an NVIDIA device; none was available to write this")
def test_build_engines_on_device(llama_src, tmp_path):
    from eec.targets.engines import build_engines

    out = tmp_path / "gpu.eec"
    compile_model(llama_src / "hf", out, exits=[2, 4], target="rtx-4090", calibrate=False)
    cpu_tokens = load(out).generate([3, 17, 42], max_new_tokens=8, mode="full").tokens
    manifest = build_engines(out)
    assert manifest.engines and any((out / "engines").iterdir())
    assert load(out).generate([3, 17, 42], max_new_tokens=8, mode="full").tokens == cpu_tokens
    table = measure_artifact(out, repeats=2)  # through the engines
    assert table.target == "rtx-4090" and all(v > 0 for v in table.segments.values())


def test_cli_exits_none_compiles_the_full_model_alone(llama_src, tmp_path):
    result = runner.invoke(app, ["compile", str(llama_src / "hf"), "-o", str(tmp_path / "n.eec"), "--exits", "none",
                                 "--no-calibrate"])
    assert result.exit_code == 0, result.output
    model = load(tmp_path / "n.eec")
    assert len(model.manifest.segments) == 1 and model.exits == []
    assert model.generate([3, 17, 42], max_new_tokens=5, epsilon=0.9).exits == [6] * 5


def test_other_cpu_use_sees_a_busy_core():
    import subprocess
    import sys

    from eec.targets.measure import busy_warning, other_cpu_use

    if other_cpu_use(0.05) is None:
        pytest.skip("no /proc/stat on this system")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)  # let it start spinning
        assert other_cpu_use(0.5) >= 0.5  # one core's worth, less scheduling slack
        assert "other work is using" in busy_warning()
    finally:
        hog.kill()


def test_measure_warns_on_a_busy_machine(measured, tmp_path, monkeypatch):
    from eec.targets import measure

    art, _, _ = measured
    monkeypatch.setattr(measure, "other_cpu_use", lambda seconds=0.3: 1.3)
    result = runner.invoke(app, ["targets", "measure", str(art), "-o", str(tmp_path / "p.json"),
                                 "--repeats", "1", "--past", "8"])
    assert result.exit_code == 0, result.output
    assert "other work is using 1.3 cores" in result.output
    monkeypatch.setattr(measure, "other_cpu_use", lambda seconds=0.3: 0.0)
    quiet = runner.invoke(app, ["targets", "measure", str(art), "-o", str(tmp_path / "p.json"), "--repeats", "1",
                                "--past", "8"])
    assert quiet.exit_code == 0 and "other work" not in quiet.output


def test_speculative_weight_bytes_match_early_exit_where_they_read_the_same(llama_compiled):
    # One draft a cycle, one token a cycle: every token reads every segment and the draft exit's head,
    # as an early-exit token that goes to the last layer past that exit alone does.
    from eec.runtime import load
    from eec.targets.profiling import bytes_per_token, speculative_bytes_per_token

    model = load(llama_compiled.artifact)
    for draft in model.exits:
        deep = bytes_per_token(model, {model.num_layers: 1}, {draft: 0.5})
        assert speculative_bytes_per_token(model, draft, {1: 10}, 10) == pytest.approx(deep)
    # Four drafts a cycle, two tokens kept: the draft part twice per token, the deep part half.
    first = model.exits[0]
    draft_part = bytes_per_token(model, {first: 1}, {first: 0.5})  # segments up to the exit, and its head
    deep_part = bytes_per_token(model, {model.num_layers: 1}, None) - bytes_per_token(model, {first: 1}, None)
    assert speculative_bytes_per_token(model, first, {4: 5}, 10) == pytest.approx(2 * draft_part + 0.5 * deep_part)


def test_weight_bytes_a_token_reads_are_the_models_weights(llama_compiled, tmp_path):
    """The bandwidth figure's bytes, counted on transformers' model: a deep token reads every layer's
    weights and the LM head (4 bytes each in fp32; norms aside, under 1%), an exited one the layers up
    to its exit and the heads it passed. In int4 half a byte and a 4-byte scale per 32 weights."""
    from eec.runtime import load
    from eec.targets.profiling import bytes_per_token

    hf = llama_compiled.hf
    linear = {name: p.numel() for name, p in hf.named_parameters() if "norm" not in name and "embed" not in name}
    per_layer = [sum(n for name, n in linear.items() if f"layers.{i}." in name) for i in range(hf.config.num_hidden_layers)]
    head = linear["lm_head.weight"]
    model = load(llama_compiled.artifact)
    deep = bytes_per_token(model, {model.num_layers: 1}, None)
    assert deep == pytest.approx(4 * (sum(per_layer) + head), rel=1e-9)
    first = model.exits[0]  # the model's own head at every exit: the LM head's size
    assert bytes_per_token(model, {first: 1}, {first: 0.5}) == pytest.approx(4 * (sum(per_layer[:first]) + head))
    compile_model(llama_compiled.artifact.parent / "llama-hf", tmp_path / "int4.eec", exits=[], precision="int4",
                  calibrate=False)
    int4 = load(tmp_path / "int4.eec")
    assert bytes_per_token(int4, {int4.num_layers: 1}, None) == pytest.approx((0.5 + 4 / 32) * (sum(per_layer) + head))


def _row(eps, tps, speedup, agreement=1.0, mode="early-exit"):
    from eec.targets.profiling import ProfileRow

    return ProfileRow(eps, tps, speedup, speedup, agreement, mode=mode)


@pytest.mark.parametrize("rows, recommended", [
    ([_row(None, 40.0, 1.0, mode="full"), _row(0.8, 31.0, 0.78, 0.93), _row(0.9, 36.0, 0.9, 0.97)],
     "recommended: --mode full: no exit pays"),
    ([_row(None, 40.0, 1.0, mode="full"), _row(0.8, 60.0, 1.5, 0.91), _row(0.9, 52.0, 1.3, 0.96)],
     "recommended: --eps 0.8 (1.50x, 91.0% agreement)"),
    ([_row(None, 40.0, 1.0, mode="full"), _row(0.8, 44.0, 1.1, 0.9), _row(0.5, 60.0, 1.5, mode="speculative")],
     "recommended: --mode speculative, 1.50x"),
    ([_row(None, 40.0, 1.0, mode="full"), _row(0.8, 41.6, 1.04, 0.99)], "recommended: --mode full"),  # within noise
])
def test_profile_verdict_says_what_pays(rows, recommended):
    from eec.targets.profiling import verdict

    lines = verdict(rows)
    assert lines[0] == "full mode: 40.0 tok/s on this machine"
    assert lines[-1].startswith(recommended), lines
    assert sum(line.startswith("early exit at") for line in lines) == sum(r.mode == "early-exit" for r in rows)
