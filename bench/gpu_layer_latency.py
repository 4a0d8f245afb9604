"""Check the roofline latency model of a GPU target against layer ranges timed on that GPU.

Builds a random-weight model of SmolLM2-135M's shape (latency does not
depend on the weights), runs eec's own plain-PyTorch segment modules (the
graph TensorRT targets get) in fp16 on CUDA, and times layer ranges at 1..8
new tokens after 128 cached positions, eagerly and replayed as a CUDA graph.
Prints measured / predicted for `eec.targets.latency.model_table`. Usage, on
the GPU machine:

    python bench/gpu_layer_latency.py --target h100
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eec.compiler.modules import DecoderLayer, ExitHead, LastPositionHead, Segment
from eec.targets.latency import ModelShape, model_table
from eec.targets.profiles import get_target

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True)


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def graphed(fn):
    """The same call captured once as a CUDA graph: no per-kernel launch cost from Python."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="h100")
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    dev, dtype = torch.device("cuda"), torch.float16
    config = LlamaConfig(**SMOLLM2)
    hf = LlamaForCausalLM(config).to(dev, dtype).eval()
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // n_heads
    shape = ModelShape("llama", config.num_hidden_layers, config.hidden_size, config.intermediate_size, n_heads, n_kv,
                       head_dim, config.vocab_size)
    table = model_table(get_target(args.target), shape, "fp16")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; predictions: {args.target} fp16 roofline "
          f"(+{table.call_overhead * 1e6:.0f} µs per call)")
    print(f"{'layers':>7} {'tokens':>6} {'predicted µs':>13} {'eager µs':>9} {'graph µs':>9} {'graph/pred':>10}")
    rotary = hf.model.rotary_emb
    for n_layers in (1, 4, 8, 30):
        layers = [DecoderLayer(hf.model.layers[j], n_heads, n_kv, head_dim, config.rms_norm_eps) for j in range(n_layers)]
        seg = Segment(layers, rotary.inv_freq, rotary.attention_scaling, None, None, True).eval()
        for seq in (1, 2, 8):
            x = torch.randn(1, seq, config.hidden_size, device=dev, dtype=dtype)
            pos = torch.arange(args.past, args.past + seq, device=dev)[None]
            mask = torch.ones(1, args.past + seq, dtype=torch.int64, device=dev)
            kv = [torch.randn(1, n_kv, args.past, head_dim, device=dev, dtype=dtype) for _ in range(2 * n_layers)]

            def call():
                with torch.no_grad():
                    return seg(x, pos, mask, *kv)

            eager = timed(call, args.repeats)
            graph = timed(graphed(call), args.repeats)
            predicted = table.range_cost(0, n_layers, seq) - (table.final_head if n_layers == shape.num_layers else 0)
            print(f"{n_layers:7d} {seq:6d} {predicted * 1e6:13.1f} {eager * 1e6:9.1f} {graph * 1e6:9.1f} "
                  f"{graph / predicted:10.2f}")
    head = LastPositionHead(ExitHead(hf.model.norm.weight.data, config.rms_norm_eps, hf.lm_head)).eval()
    h = torch.randn(1, 1, config.hidden_size, device=dev, dtype=dtype)

    def head_call():
        with torch.no_grad():
            return head(h)

    print(f"exit head (576 x 49152): predicted {(table.final_head + table.call_overhead) * 1e6:.1f} µs, "
          f"eager {timed(head_call, args.repeats) * 1e6:.1f} µs, graph {timed(graphed(head_call), args.repeats) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
