"""The GPU path: fp16 artifacts with a half-precision KV, and onnxruntime's CUDA provider keeping that KV on
the GPU. The CPU tests run everywhere; the CUDA ones where onnxruntime has its CUDA provider and a GPU."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from eec.cli.main import app
from eec.compiler import compile_model
from eec.errors import InputError
from eec.runtime import load
from tests.reference import exit_logits, hf_forward, in_half_precision

PROMPT = [7, 21, 3, 55, 11, 80, 2]
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu (its CUDA provider) and an NVIDIA GPU")
runner = CliRunner()


@pytest.fixture(scope="module")
def fp16_artifact(llama_src):
    out = llama_src / "cuda-fp16.eec"
    if not out.exists():
        compile_model(llama_src / "hf", out, exits=[2, 4], target="cuda", calibration_tokens=8)
    return out


@pytest.fixture(scope="module")
def hf(llama_src):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_src / "hf").eval()


def kv_types(path):
    graph = onnx.load(path, load_external_data=False).graph
    return {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}


def test_fp16_artifact_has_a_half_precision_kv_and_float_hidden_states(fp16_artifact):
    manifest = load(fp16_artifact, device="cpu").manifest
    assert (manifest.precision, manifest.target) == ("fp16", "cuda")
    files = [s.file for s in manifest.segments] + [s.graph("with_head") for s in manifest.segments if s.graph("with_head")]
    assert len(files) == 5  # three segments and the two exit segments with their head inside
    for f in files:
        types = kv_types(fp16_artifact / f)
        kv = {n: t for n, t in types.items() if n.startswith(("past_", "present_"))}
        assert kv and set(kv.values()) == {onnx.TensorProto.FLOAT16}, f
        assert {t for n, t in types.items() if n in ("hidden", "hidden_out", "exit_scores")} <= {onnx.TensorProto.FLOAT}
        ops = {n.op_type for n in onnx.load(fp16_artifact / f, load_external_data=False).graph.node}
        assert "GroupQueryAttention" in ops  # the CUDA target keeps onnxruntime's fused kernels


def decode(model, capacity, thresholds, steps=20):
    decoder = model.new_decoder(capacity=capacity)
    result = decoder.step(np.asarray([PROMPT]), None)
    tokens, exits = [result.token], [result.exit_layer]
    for _ in range(steps):
        result = decoder.step(np.asarray([[tokens[-1]]]), thresholds)
        tokens.append(result.token)
        exits.append(result.exit_layer)
    return decoder, tokens, exits


def fp16_runs(hf, sequence, half=None):
    """transformers' fp32 run of ``sequence`` and its own fp16 run (``half``: `in_half_precision(hf)`):
    the reference, and what half precision alone moves it by."""
    return hf_forward(hf, sequence), hf_forward(half or in_half_precision(hf), sequence)


def fp16_bound(want, in_half) -> float:
    """How far an fp16 computation of ``want`` may sit from it: twice what transformers' fp16 run moved it
    (``in_half``), plus half an fp16 step at the largest value. fp16 compounds through the layers (on these
    random layers about 0.004 at layer 0, 0.09 at layer 5, with values near 8): a fixed tolerance is either
    loose at the first layers or wrong at the last."""
    return 2 * float((in_half.float() - want).abs().max()) + 2.0 ** -11 * float(want.abs().max())


def check_fp16_tokens(hf, prompt, tokens, exits, half=None, runs=None):
    """Each token is transformers' fp32 token at the layer it left through, except at a near-tie that
    half precision can flip: where the fp32 head's best logit beats this token's by no more than twice
    what fp16 moves that head's logits at that position (``runs``: `fp16_runs` of prompt and tokens)."""
    full, half_out = runs or fp16_runs(hf, list(prompt) + list(tokens[:-1]), half)
    for i, (token, layer) in enumerate(zip(tokens, exits)):
        at = len(prompt) - 1 + i
        want = exit_logits(hf, full.hidden_states, layer)[at]
        moved = float((exit_logits(hf, half_out.hidden_states, layer)[at] - want).abs().max())
        assert float(want.max() - want[token]) <= 2 * moved, (i, layer, float(want.max() - want[token]), moved)


def check_fp16_kv(specs, states, runs):
    """Every layer's half-precision KV (the positions each segment holds) is transformers' fp32 cache
    within `fp16_bound`."""
    full, half_out = runs
    for spec, state in zip(specs, states):
        assert state.kv_dtype == np.float16
        for i, layer in enumerate(range(spec.start, spec.stop)):
            for got, which in ((state.kv[2 * i], "keys"), (state.kv[2 * i + 1], "values")):
                want = getattr(full.past_key_values.layers[layer], which)
                bound = fp16_bound(want, getattr(half_out.past_key_values.layers[layer], which))
                assert got.dtype == np.float16
                error = float(np.abs(got.astype(np.float32) - want[:, :, : state.length].numpy()).max())
                assert error <= bound, (layer, which, error, bound)


def check_against_transformers(hf, decoder, tokens, exits):
    """Tokens are transformers' at the layer each left through (`check_fp16_tokens`), every segment holds
    the positions it should, and their KV is transformers' within what fp16 explains (`check_fp16_kv`)."""
    sequence = PROMPT + tokens[:-1]
    runs = fp16_runs(hf, sequence)
    check_fp16_tokens(hf, PROMPT, tokens, exits, runs=runs)
    covered = len(sequence)  # the first segment holds every position; a deeper one no more than the one before
    for spec, state in zip(decoder.specs, decoder.states):
        pending = 0 if state.pending[0] is None else len(state.pending[0])
        assert state.length + pending == covered if spec.start == 0 else state.length + pending <= covered
        covered = state.length + pending
    check_fp16_kv(decoder.specs, decoder.states, runs)


def mixed(model):
    """Per-exit thresholds at the median score of a run where nothing exits: some tokens leave, some do not."""
    decoder, _, _ = decode(model, 64, {e: math.inf for e in model.exits}, steps=0)
    seen = {e: [] for e in model.exits}
    token = decoder.step(np.asarray([[5]]), None).token
    for _ in range(16):
        result = decoder.step(np.asarray([[token]]), {e: math.inf for e in model.exits}, trace=True)
        token = result.token
        for e in model.exits:
            seen[e].append(result.scores[e][0])
    return {e: float(np.median(v)) for e, v in seen.items()}


def test_fp16_kv_on_the_cpu_matches_transformers_through_growth_and_catch_up(fp16_artifact, hf):
    model = load(fp16_artifact, device="cpu")
    decoder, tokens, exits = decode(model, len(PROMPT) + 2, mixed(model))
    assert set(exits) - {6} and exits.count(6) > 1, "need both exited tokens and catch-ups"
    assert decoder.states[0].capacity > len(PROMPT) + 2, "the buffers never grew"
    check_against_transformers(hf, decoder, tokens, exits)


def test_device_choice_is_checked(fp16_artifact, llama_compiled):
    with pytest.raises(InputError, match="device must be one of"):
        load(fp16_artifact, device="tpu")
    with pytest.raises(InputError, match="tensorrt"):
        load(fp16_artifact, device="tensorrt")
    with pytest.raises(InputError, match="cuda"):  # an fp32 artifact, or no CUDA provider here
        load(llama_compiled.artifact, device="cuda")
    assert load(llama_compiled.artifact).device == "cpu"  # auto never puts an fp32 artifact on CUDA
    assert load(fp16_artifact).device == ("cuda" if HAS_CUDA else "cpu")
    result = runner.invoke(app, ["generate", str(fp16_artifact), "1,2,3", "--ids", "--device", "gpu"])
    assert result.exit_code == 1 and "device must be one of" in result.output


def forced(model, tokens):
    """Teacher-force ``tokens`` after the prompt, leaving at the first exit on every other step (so exits,
    catch-ups, fused heads and the buffers' growth all happen whatever the scores say). Returns the decoder
    and every step's hidden state at the first exit."""
    decoder = model.new_decoder(capacity=len(PROMPT) + 2)
    decoder.step(np.asarray([PROMPT]), None)
    first, hidden = model.exits[0], []
    for i, token in enumerate(tokens):
        leave = -math.inf if i % 2 else math.inf
        result = decoder.step(np.asarray([[token]]), {e: leave for e in model.exits}, trace=True)
        assert result.exit_layer == (first if i % 2 else 6)
        hidden.append(result.hidden[first])
    return decoder, np.concatenate(hidden)


@needs_cuda
def test_cuda_keeps_the_kv_on_the_gpu_and_computes_the_model(fp16_artifact, hf):
    """The CUDA provider computes in half precision where onnxruntime's CPU provider mostly computes fp16
    graphs in fp32: both are held to transformers' fp32 run within what transformers' own fp16 run moves
    (`fp16_bound`), not to each other within a share of the largest value."""
    gpu, cpu = load(fp16_artifact, device="cuda"), load(fp16_artifact, device="cpu")
    assert gpu.device == "cuda" and all(s.get_providers()[0] == "CUDAExecutionProvider" for s in gpu.sessions)
    tokens = cpu.generate(PROMPT, max_new_tokens=21, mode="full").tokens
    (g, g_hidden), (c, _) = forced(gpu, tokens), forced(cpu, tokens)
    assert all(isinstance(b, ort.OrtValue) and b.device_name().lower() == "cuda" for st in g.states for b in st.buffers)
    assert g.states[0].capacity > len(PROMPT) + 2, "the buffers never grew"
    sequence = PROMPT + tokens
    runs = fp16_runs(hf, sequence)
    first = gpu.exits[0]
    want, in_half = (r.hidden_states[first][0, len(PROMPT):] for r in runs)
    assert float(np.abs(g_hidden.reshape(want.shape) - want.numpy()).max()) <= fp16_bound(want, in_half)
    for gs, cs in zip(g.states, c.states):
        assert (gs.length, None if gs.pending[0] is None else gs.pending[0].shape) == \
               (cs.length, None if cs.pending[0] is None else cs.pending[0].shape)
    check_fp16_kv(g.specs, g.states, runs)


@needs_cuda
def test_cuda_generation_computes_the_model_in_every_mode_and_repeats_itself(fp16_artifact, hf):
    gpu = load(fp16_artifact)  # auto: the CUDA provider for an fp16 artifact
    assert gpu.device == "cuda"
    half = in_half_precision(hf)
    for kwargs in (dict(mode="full"), dict(thresholds=-math.inf), dict(epsilon=0.8), dict(epsilon=0.8, catch_up="exact")):
        first = gpu.generate(PROMPT, max_new_tokens=24, ignore_eos=True, **kwargs)
        assert len(first.tokens) == 24
        check_fp16_tokens(hf, PROMPT, first.tokens, first.exits, half)  # each token at the layer it left through
        assert gpu.generate(PROMPT, max_new_tokens=24, ignore_eos=True, **kwargs).tokens == first.tokens, kwargs
    assert set(gpu.generate(PROMPT, max_new_tokens=8, thresholds=-math.inf).exits[1:]) == {2}
