"""onnxruntime's weight-only quantizer options on SmolLM2-135M-Instruct: teacher-forced agreement of each
variant's full mode with the fp32 full mode, and its decode speed. Usage:

    .venv/bin/python bench/quantizer_variants.py [--work bench-work] [VARIANT ...]

Each variant rewrites the fp32 artifact's one segment with `MatMulNBitsQuantizer` (bits, block size,
symmetric or not, `accuracy_level` 4 = int8 activations or 0 = fp32, the LM head at 8 bits, or the HQQ
algorithm), or with eec's own int4 passes (`int4-gguf-acc4`: the GGUF's Q4_1 blocks carried over),
and loads the copy without re-hashing it. It explores what eec's `--precision` could use; it
is not a compile path.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from full_vs_transformers import smollm2_gguf  # noqa: E402

from eec.calib.calibrate import read_prompt_lines  # noqa: E402
from eec.compiler import compile_model  # noqa: E402
from eec.compiler.passes.weight_only import quiet_logging  # noqa: E402
from eec.runtime import load  # noqa: E402
from eec.runtime.evaluate import agreement  # noqa: E402

VARIANTS = {
    "int4-sym-acc4": dict(bits=4, block_size=32, is_symmetric=True, accuracy_level=4),  # eec's int4
    "int4-gguf-acc4": dict(bits=4, block_size=32, accuracy_level=4, carry=True),  # eec's int4-gguf (Q4CarryOver)
    "int4-asym-acc4": dict(bits=4, block_size=32, is_symmetric=False, accuracy_level=4),
    "int4-sym-acc0": dict(bits=4, block_size=32, is_symmetric=True, accuracy_level=0),
    "int4-asym-acc4-head8": dict(bits=4, block_size=32, is_symmetric=False, accuracy_level=4, head_bits=8),
    "int4-sym-acc4-b16-head8": dict(bits=4, block_size=16, is_symmetric=True, accuracy_level=4, head_bits=8),
    "int4-hqq-b32": dict(bits=4, block_size=32, algo="hqq"),
    "int8-sym-acc4": dict(bits=8, block_size=32, is_symmetric=True, accuracy_level=4),  # eec's int8
    "int8-asym-acc4": dict(bits=8, block_size=32, is_symmetric=False, accuracy_level=4),
    "int8-sym-acc4-b16": dict(bits=8, block_size=16, is_symmetric=True, accuracy_level=4),
    "int8-sym-acc0": dict(bits=8, block_size=32, is_symmetric=True, accuracy_level=0),
}


def quantize(fp32: Path, out: Path, bits: int, block_size: int, is_symmetric: bool = True, accuracy_level: int = 4,
             head_bits: int | None = None, algo: str | None = None, carry: bool = False) -> Path:
    import onnx

    with quiet_logging():
        from onnxruntime.quantization import matmul_nbits_quantizer as q

    if out.exists():
        return out
    shutil.copytree(fp32, out)
    seg = out / "segments" / "seg0.onnx"
    if carry:  # eec's own passes, as `--precision int4-gguf` applies them
        from eec.compiler.precision import apply_precision

        apply_precision(seg, "int4-gguf", block_size)
        return out
    model = onnx.load(seg)
    sizes = {i.name: i.dims for i in model.graph.initializer}
    # The LM head: the one MatMul whose weight is as wide as the vocabulary.
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and sizes.get(n.input[1], [0])[-1] > 10000]
    config = q.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits) if algo == "hqq" else None
    with quiet_logging():
        quantizer = q.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=is_symmetric,
                                           accuracy_level=accuracy_level, algo_config=config,
                                           nodes_to_exclude=head if head_bits else None)
        quantizer.process()
        model = quantizer.model.model
        if head_bits:
            quantizer = q.MatMulNBitsQuantizer(model, bits=head_bits, block_size=block_size, is_symmetric=True,
                                               accuracy_level=accuracy_level, nodes_to_include=head)
            quantizer.process()
            model = quantizer.model.model
    for f in (seg, seg.with_name("seg0.onnx.data")):
        f.unlink()
    onnx.save(model, seg, save_as_external_data=True, location="seg0.onnx.data")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help=f"default: all of {', '.join(VARIANTS)}")
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    work = args.work.absolute()
    work.mkdir(exist_ok=True)
    fp32 = work / "smollm2-fp32-one-segment.eec"
    if not fp32.exists():
        compile_model(smollm2_gguf(), fp32, exits=[], precision="fp32", calibrate=False)
    reference = load(fp32)
    texts = read_prompt_lines(Path(__file__).parent / "heldout_prompts.txt")[: args.prompts]
    prompts = [reference.encode(t) for t in texts]
    continuations = [reference.generate(p, max_new_tokens=args.tokens, mode="full", ignore_eos=True).tokens
                     for p in prompts]
    print(f"{'variant':26} {'agreement':>9} {'worst':>6} {'decode tok/s':>12}", flush=True)
    for name in args.variants or VARIANTS:
        model = load(quantize(fp32, work / f"smollm2-{name}.eec", **VARIANTS[name]), verify=False)
        scores = [agreement(model, p, c) for p, c in zip(prompts, continuations)]
        speeds = []
        for p in prompts[:3]:
            model.generate(p, max_new_tokens=64, mode="full", ignore_eos=True)
            speeds.append(model.stats.tokens_per_s)
        print(f"{name:26} {statistics.mean(scores):9.3f} {min(scores):6.3f} {statistics.median(speeds):12.1f}",
              flush=True)


if __name__ == "__main__":
    main()
