"""Independent references computed with transformers, for comparing eec against."""

from __future__ import annotations

import torch


def hf_greedy(hf, prompt: list[int], max_new_tokens: int, stop_at_eos: bool = False) -> list[int]:
    """transformers' greedy tokens; without stop_at_eos the end-of-sequence token is not special."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens,
            min_new_tokens=None if stop_at_eos else max_new_tokens,
            do_sample=False, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt):].tolist()


def chat_ids(tok, text: str) -> list[int]:
    """transformers' token ids of ``text`` as a user turn in the tokenizer's chat template."""
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def hf_forward(hf, sequence: list[int]):
    with torch.no_grad():
        return hf(torch.tensor([sequence]), output_hidden_states=True, use_cache=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def exit_tokens(hf, hidden_states, layer: int, norm_weight=None, proj_weight=None) -> list[int]:
    """argmax of an exit head at ``layer`` for every position, from transformers' hidden states.

    Without weights it is the model's own final norm and LM head (a shared exit).
    """
    return exit_logits(hf, hidden_states, layer, norm_weight, proj_weight).argmax(-1).tolist()


def exit_logits(hf, hidden_states, layer: int, norm_weight=None, proj_weight=None) -> torch.Tensor:
    """An exit head's fp32 logits at ``layer`` for every position ([positions, vocab])."""
    n = hf.config.num_hidden_layers
    h = hidden_states[layer][0].float()
    with torch.no_grad():
        if layer == n:  # transformers' last hidden state is already normed
            return hf.lm_head(h)
        norm_w = hf.model.norm.weight if norm_weight is None else norm_weight
        proj_w = hf.lm_head.weight if proj_weight is None else proj_weight
        return rms_norm(h, norm_w, hf.config.rms_norm_eps) @ proj_w.T


def in_half_precision(hf):
    """A copy of ``hf`` computing in fp16 (transformers' own kernels): what half precision alone moves
    a value by, the yardstick for fp16 artifacts."""
    import copy

    return copy.deepcopy(hf).half()


def propagated_forward(hf, sequence: list[int], exited: dict[int, int]):
    """transformers' forward with CALM's state propagation: a position that exited at layer ``e``
    (``exited[position] = e``) enters every layer from ``e`` on with its hidden state at the exit,
    so those layers' keys and values for it are projected from that state. Returns the logits
    and each layer's input ([1, seq, hidden]), the exits' hidden states among them.

    Built on transformers' own layers with input hooks, independently of eec's fill graphs."""
    inputs: dict[int, torch.Tensor] = {}

    def substitute(layer: int):
        def hook(module, args, kwargs):
            h = args[0].clone()
            for position, e in exited.items():
                if e < layer:
                    h[:, position] = inputs[e][:, position]
            inputs[layer] = h
            return (h, *args[1:]), kwargs
        return hook

    handles = [block.register_forward_pre_hook(substitute(i), with_kwargs=True)
               for i, block in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            logits = hf(torch.tensor([sequence])).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits, inputs


def _levels(blocks: torch.Tensor, scale: torch.Tensor, zero) -> torch.Tensor:
    """onnxruntime's weight quantizer's levels, in its own fp32 arithmetic: ``v * (1 / scale) + zero``
    as two roundings (a product, then a sum; not v / scale, not a fused multiply-add), then rounded
    half away from zero (C's roundf). A GGUF's Q4_1 grid puts many weights on exact halves of a step,
    where each of those choices lands a level elsewhere: dividing instead of multiplying by the
    reciprocal moved 2 of layer 0's 1.77M gate/up weights in SmolLM2, a fused add 2-7 a matrix,
    rounding half to even hundreds. This form matched the quantizer on every one of them."""
    reciprocal = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)
    return _roundf(blocks * reciprocal + zero)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    whole = torch.trunc(x)  # x - whole is exact in fp32, so a half is seen as one
    return torch.where((x - whole).abs() >= 0.5, whole + torch.sign(x), whole)


def blockwise_weights(w_t: torch.Tensor, block: int, bits: int) -> torch.Tensor:
    """MatMulNBits' symmetric weights, dequantized: blocks of ``block`` along the input dimension of
    ``w_t`` ([in, out], zero-padded to whole blocks), the largest-magnitude weight of a block at the
    most negative level (-8 of -8..7 for 4 bits), levels as the quantizer computes them (`_levels`)."""
    low = -(2 ** (bits - 1))
    k, n = w_t.shape
    padded = torch.nn.functional.pad(w_t, (0, 0, 0, -k % block))
    blocks = padded.T.reshape(n, -1, block)
    high, least = blocks.amax(-1, keepdim=True), blocks.amin(-1, keepdim=True)
    scale = torch.where(-least >= high, least, high) / low  # a tie in magnitude goes to the negative end
    q = torch.clamp(_levels(blocks, scale, -low), 0, -2 * low - 1) + low
    return (q * scale).reshape(n, -1)[:, :k].T


def _asymmetric(w_t: torch.Tensor, block: int, bits: int = 4) -> torch.Tensor:
    """MatMulNBits' asymmetric weights, dequantized: each block's range widened to hold 0, split in
    2^bits - 1 steps, zero point rounded (onnxruntime's quantizer when a graph needs asymmetric blocks)."""
    top = 2 ** bits - 1
    k, n = w_t.shape
    blocks = torch.nn.functional.pad(w_t, (0, 0, 0, -k % block)).T.reshape(n, -1, block)
    low, high = blocks.amin(-1, keepdim=True).clamp(max=0), blocks.amax(-1, keepdim=True).clamp(min=0)
    scale = (high - low) / top
    zero = torch.clamp(_roundf(0.0 - low / torch.where(scale != 0, scale, 1.0)), 0, top)  # a quotient here, as the quantizer has it
    q = torch.clamp(_levels(blocks, scale, zero), 0, top)
    return ((q - zero) * scale).reshape(n, -1)[:, :k].T


def _q4_1_minima(w_t: torch.Tensor, block: int) -> torch.Tensor | None:
    """Each block's minimum ([blocks, out]) where every block of ``w_t`` ([in, out]) is a Q4_1 block as a
    GGUF stores it (16 levels m + d q, d = range / 15); None for any other weight."""
    k, n = w_t.shape
    if k % block:
        return None
    blocks = w_t.T.reshape(n, k // block, block)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step = torch.where(high > low, (high - low) / 15, torch.ones_like(high))
    levels = (blocks - low) / step
    if not bool(((levels - torch.round(levels)).abs() <= 1e-3).all()):
        return None
    return low[..., 0].T


def _activations_by_block(x: torch.Tensor, block: int) -> torch.Tensor:
    """onnxruntime's int8 activations for MatMulNBits at accuracy level 4: each row's blocks of
    ``block`` scaled symmetrically to -127..127, as its kernel computes them in fp32 (scale max |x| / 127,
    levels x * (127 / max |x|) rounded half to even: a product by the inverse, not x / scale). The
    inverse is an IEEE division: torch computes ``127 / tensor`` as 127 times the reciprocal, which
    is a different float in a quarter of cases and moved levels of SmolLM2's layer-0 activations where
    the product sat next to a half."""
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, -k % block))
    blocks = padded.reshape(*x.shape[:-1], -1, block)
    top = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(top > 0, torch.full_like(top, 127.0) / torch.where(top > 0, top, 1), 0)
    return (torch.round(blocks * inverse) * (top / 127)).reshape(*x.shape[:-1], -1)[..., :k]


def _activations_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear: the whole call's input to uint8, range widened to hold 0, zero point rounded."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255 or 1.0
    zero = float(torch.clamp(torch.round(torch.tensor(-low / scale)), 0, 255))
    q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return (q - zero) * scale


def quantized_twin(hf, precision: str, block: int = 32, jitter: float = 0.0):
    """A copy of a transformers model computing what an eec artifact at ``precision`` computes on the
    CPU, written from onnxruntime's documented kernels rather than eec's passes: every linear layer's
    weight dequantized (``int4``/``int8``: MatMulNBits' symmetric blocks; ``int8-dynamic``: per output
    channel, max |w| / 127) and its input quantized as the kernel does (by block of each row at
    accuracy level 4; per call for the dynamic MatMulInteger). The embedding and norms stay fp32.
    ``jitter`` scales every quantized input by 1 + jitter first: a twin whose activations land on the
    other side of a rounding step now and then, as two fp32 computations of one value may."""
    import copy

    twin = copy.deepcopy(hf)
    for module in twin.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        with torch.no_grad():
            w = module.weight.detach().clone()  # [out, in]; a new parameter unties a tied LM head from the embedding
            by_block = lambda m, args: (_activations_by_block(args[0] * (1 + jitter), block),)  # noqa: E731
            if precision in ("int4", "int8"):
                module.weight = torch.nn.Parameter(blockwise_weights(w.T, block, 4 if precision == "int4" else 8).T)
                module.register_forward_pre_hook(by_block)
            elif precision == "int8-dynamic":
                scale = w.abs().amax(1, keepdim=True) / 127
                module.weight = torch.nn.Parameter(torch.clamp(torch.round(w / scale), -127, 127) * scale)
                module.register_forward_pre_hook(lambda m, args: (_activations_per_tensor(args[0] * (1 + jitter)),))
            elif precision == "int4-gguf":
                minima = _q4_1_minima(w.T, block)
                if minima is None:  # not a Q4_1 weight: asymmetric int4, as the whole graph is quantized
                    module.weight = torch.nn.Parameter(_asymmetric(w.T, block).T)
                    module.register_forward_pre_hook(by_block)
                else:  # x @ (W - m) in int4, plus the fp32 product of each block's sum with its minimum
                    shifted = w - minima.T.repeat_interleave(block, dim=1)
                    # W - m holds levels d * q up to fp32 rounding: quantized as the graph's is, its scale
                    # is range / 15 rounded, not the GGUF's d, and every level is exact
                    shifted = _asymmetric(shifted.T, block).T
                    module.register_forward_hook(_carried(shifted, minima, block, jitter))
            else:
                raise ValueError(precision)
    return twin


def _carried(shifted: torch.Tensor, minima: torch.Tensor, block: int, jitter: float):
    def forward(module, args, output):
        x = args[0]
        sums = x.reshape(*x.shape[:-1], -1, block).sum(-1)
        main = _activations_by_block(x * (1 + jitter), block) @ shifted.T
        out = main + sums @ minima
        return out if module.bias is None else out + module.bias
    return forward


def stepwise_logits(hf, prompt: list[int], reference: list[int]) -> torch.Tensor:
    """transformers' last-position logits after the prompt (one call) and after each reference token
    (one call each, through the cache), as eec's teacher-forced evaluation feeds them: [len(reference), vocab]."""
    from transformers import DynamicCache

    cache, feed, rows = DynamicCache(), list(prompt), []
    with torch.no_grad():
        for token in reference:
            rows.append(hf(torch.tensor([feed]), past_key_values=cache, use_cache=True).logits[0, -1])
            feed = [int(token)]
    return torch.stack(rows)
