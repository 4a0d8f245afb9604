"""Plain PyTorch modules for one decoder segment, written to export cleanly.

A segment holds layers ``[start, stop)`` of a Llama-family backbone; the
last one has the final head inside, at its end. Everything is explicit tensors
in and out (no cache objects, no config lookups at trace time), so the ONNX
graph has exactly the inputs and outputs the runtime drives:

    inputs   input_ids | hidden, position_ids, attention_mask,
             past_key_<i>, past_value_<i> for each layer i of the segment
    outputs  hidden_out (unless last), present_key_<i>, present_value_<i>,
             token, scores (last segment only)

`KVFill` is a segment's optional second graph for the propagating catch-up
(same inputs, the presents only).

An exit head is a graph of its own (`LastPositionHead`): onnxruntime runs a
whole graph whatever outputs are asked for, so a head inside a middle
segment would cost every token that passes it, in full mode too.

The weights are the Hugging Face model's own tensors (shared, not copied);
tests compare these modules against transformers token for token.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from eec.compiler import ops


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear computing several that read the same input: one weight-only
    quantized matmul instead of three (q, k, v) or two (gate, up)."""
    out = sum(lin.out_features for lin in linears)
    biased = [lin.bias is not None for lin in linears]
    packed = nn.Linear(linears[0].in_features, out, bias=any(biased))
    packed.weight = nn.Parameter(torch.cat([lin.weight.data for lin in linears]), requires_grad=False)
    if any(biased):
        bias = [lin.bias.data if lin.bias is not None else torch.zeros(lin.out_features) for lin in linears]
        packed.bias = nn.Parameter(torch.cat(bias), requires_grad=False)
    return packed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, hf_attn: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.q_proj, self.k_proj = hf_attn.q_proj, hf_attn.k_proj
        self.v_proj, self.o_proj = hf_attn.v_proj, hf_attn.o_proj
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.hidden_size = hf_attn.q_proj.in_features
        self.scale = head_dim**-0.5

    def forward(self, x, cos, sin, allowed, past_k, past_v):
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        # Grouped-query attention: query heads are grouped over the KV heads by
        # a reshape, not by repeating the KV (no copy of the cache per step).
        group = self.n_heads // self.n_kv_heads
        qg = q.reshape(bsz, self.n_kv_heads, group * seq, self.head_dim)
        scores = torch.matmul(qg, k.transpose(2, 3)) * self.scale
        scores = scores.view(bsz, self.n_kv_heads, group, seq, -1)
        scores = scores.masked_fill(~allowed[:, None, None, :, :], torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1).view(bsz, self.n_kv_heads, group * seq, -1)
        out = torch.matmul(probs, v).view(bsz, self.n_heads, seq, self.head_dim)
        out = out.transpose(1, 2).reshape(bsz, seq, self.n_heads * self.head_dim)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, hf_mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = hf_mlp.gate_proj, hf_mlp.up_proj, hf_mlp.down_proj

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.input_norm = RMSNorm(hf_layer.input_layernorm.weight.data, eps)
        self.attn = Attention(hf_layer.self_attn, n_heads, n_kv_heads, head_dim)
        self.post_norm = RMSNorm(hf_layer.post_attention_layernorm.weight.data, eps)
        self.mlp = MLP(hf_layer.mlp)

    def forward(self, x, cos, sin, allowed, past_k, past_v):
        attn_out, k, v = self.attn(self.input_norm(x), cos, sin, allowed, past_k, past_v)
        x = x + attn_out
        return x + self.mlp(self.post_norm(x)), k, v


class OrtAttention(nn.Module):
    """Attention as `ops.gqa` (onnxruntime's GroupQueryAttention, rotary inside) over one packed QKV projection."""

    def __init__(self, hf_attn: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.qkv = concat_linears([hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj])
        self.o_proj = hf_attn.o_proj
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.hidden_size = hf_attn.q_proj.in_features

    def forward(self, x, cos_cache, sin_cache, attention_mask, past_k, past_v):
        out, k, v = ops.gqa(self.qkv(x), past_k, past_v, attention_mask, cos_cache, sin_cache, self.n_heads, self.n_kv_heads)
        return self.o_proj(out), k, v


class OrtMLP(nn.Module):
    def __init__(self, hf_mlp: nn.Module):
        super().__init__()
        self.gate_up = concat_linears([hf_mlp.gate_proj, hf_mlp.up_proj])
        self.down_proj = hf_mlp.down_proj

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class OrtDecoderLayer(nn.Module):
    """A decoder layer in onnxruntime's contrib kernels. The segment chains the
    residual adds into the norms (`ops.skip_rms_norm`), so a layer takes the
    normed input and the residual stream, and returns its MLP output unsummed."""

    def __init__(self, hf_layer: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.input_norm = RMSNorm(hf_layer.input_layernorm.weight.data, eps)
        self.attn = OrtAttention(hf_layer.self_attn, n_heads, n_kv_heads, head_dim)
        self.post_norm = RMSNorm(hf_layer.post_attention_layernorm.weight.data, eps)
        self.mlp = OrtMLP(hf_layer.mlp)

    def forward(self, normed, residual, cos_cache, sin_cache, attention_mask, past_k, past_v):
        attn_out, k, v = self.attn(normed, cos_cache, sin_cache, attention_mask, past_k, past_v)
        normed, residual = ops.skip_rms_norm(attn_out, residual, self.post_norm.weight, self.post_norm.eps)
        return self.mlp(normed), residual, k, v


# Tokens a head returns with their logits, for sampling (`eec.runtime.sampling`): the rest of the
# vocabulary is never drawn. A TopK of 64 over SmolLM2's 49152 logits is a small part of the projection.
SAMPLE_K = 64


class ExitHead(nn.Module):
    """Norm, vocabulary projection and softmax on the last position; returns the
    token, its confidence scores and the ``SAMPLE_K`` most likely tokens with their logits.

    ``scores`` [batch, 3] holds, in the order of `eec.calib.metrics.GRAPH_METRICS`:
    top-1 minus top-2 probability ("breaking ties"), the top-1 probability and
    the negative entropy. The host reads two small tensors per exit.

    With ``token_ids`` the projection covers only those tokens (a vocabulary
    shortlist, `eec.calib.shortlist`): the softmax and the scores are over
    the shortlist and the token is mapped back to its vocabulary id.
    """

    def __init__(self, norm_weight: torch.Tensor, eps: float, proj: nn.Linear, token_ids: torch.Tensor | None = None):
        super().__init__()
        self.norm = RMSNorm(norm_weight, eps)
        self.proj = proj
        self.register_buffer("token_ids", token_ids, persistent=False)

    def shortlisted(self, ids: torch.Tensor) -> "ExitHead":
        """This head restricted to the vocabulary ids ``ids`` (a new head; the weights rows are copied)."""
        rows = nn.Linear(self.proj.in_features, len(ids), bias=self.proj.bias is not None)
        rows.weight = nn.Parameter(self.proj.weight.data[ids].clone(), requires_grad=False)
        if self.proj.bias is not None:
            rows.bias = nn.Parameter(self.proj.bias.data[ids].clone(), requires_grad=False)
        return ExitHead(self.norm.weight.data, self.norm.eps, rows, ids.clone())

    def forward(self, hidden_last: torch.Tensor):
        # Projected as [batch, 1, hidden]: a 2-D input exports as Gemm, which
        # the weight-only quantizer (MatMulNBits) does not rewrite. Back to 2-D by a Squeeze, which
        # onnxruntime runs in place, not an index (a Gather copying the logits: `FinalHead`).
        logits = self.proj(self.norm(hidden_last)[:, None, :]).squeeze(1).float()
        logp = F.log_softmax(logits, dim=-1)
        probs = logp.exp()
        # One TopK serves the token, the top-2 scores and sampling: the softmax keeps the logits'
        # order, so the two most likely tokens are the first two of the largest logits.
        values, indices = self._top(logits)
        top2 = probs.gather(-1, indices[:, :2])
        margin = top2[:, 0] - top2[:, 1]
        neg_entropy = (probs * logp).sum(-1)
        top_ids = indices if self.token_ids is None else self.token_ids[indices]
        return top_ids[:, 0], torch.stack([margin, top2[:, 0], neg_entropy], dim=-1), top_ids, values

    @staticmethod
    def _top(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Ties go to the lower index in ONNX's TopK, as in ArgMax.
        return torch.topk(logits, min(SAMPLE_K, logits.shape[-1]), dim=-1)

    def top(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``SAMPLE_K`` largest logits (fewer for a short list) and their vocabulary ids, largest first."""
        values, indices = self._top(logits)
        return (indices if self.token_ids is None else self.token_ids[indices]), values


class ExitClassifier(nn.Module):
    """CALM's learned exit measure: from an exit's hidden state (last position, RMS-normalised
    without a weight) to the probability that the exit's token equals the final head's.

    Small enough (hidden x 64) to run inside the segment for every token, so the
    vocabulary projection runs only for tokens that leave (`eec.train.classifier`).
    """

    def __init__(self, hidden_size: int, width: int = 64):
        super().__init__()
        self.inner = nn.Linear(hidden_size, width)
        self.outer = nn.Linear(width, 1)

    def logit(self, hidden_last: torch.Tensor) -> torch.Tensor:
        x = hidden_last * torch.rsqrt(hidden_last.pow(2).mean(-1, keepdim=True) + 1e-6)
        # [batch, 1, hidden] so the products export as MatMul (quantizable), not Gemm
        return self.outer(F.silu(self.inner(x[:, None, :])))[:, 0, 0]

    def forward(self, hidden_last: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(hidden_last))


class FinalHead(nn.Module):
    """The model's own norm and LM head at the end of the last segment: the token alone.

    Every token that reaches it takes its token, so no confidence is needed, and
    the softmax, top-2 and entropy over the whole vocabulary took about 2% of a
    SmolLM2 step in onnxruntime's profiler (docs/benchmarks.md, int4 parity).

    ``every_position``: the token at every position ([batch, seq]) instead of the
    last one's ([batch]): the verify graph of speculative decoding, which checks
    several drafted tokens in one call. Decoding proper keeps the last position
    alone, so that a catch-up over many positions projects one row, not all."""

    def __init__(self, head: ExitHead, every_position: bool = False):
        super().__init__()
        self.head = head
        self.every_position = every_position

    def forward(self, hidden: torch.Tensor):
        """``hidden``: [batch, seq, hidden] with ``every_position``, else the last position's [batch, hidden].
        Returns the token, and outside the verify graph the ``SAMPLE_K`` top tokens and logits (sampling)."""
        if self.every_position:
            return (self.head.proj(self.head.norm(hidden)).argmax(-1),)
        # squeeze, not [:, 0, :]: that exports as a Gather copying the logits (8 x 49152 floats at a
        # batch-8 SmolLM2 step: 290 µs under onnxruntime's profiler, within run-to-run noise timed
        # plainly), where onnxruntime runs a Squeeze in place.
        logits = self.head.proj(self.head.norm(hidden)[:, None, :]).squeeze(1)
        # The token is the first of the top logits sampling needs anyway: onnxruntime's ArgMax over
        # SmolLM2's 49152 logits took 56 µs a call against TopK's 27 (2 CPU cores), about 1% of a step.
        top_ids, top_logits = self.head.top(logits.float())
        return top_ids[:, 0], top_ids, top_logits


class LastPositionHead(nn.Module):
    """An exit head as its own graph: reads a segment's ``hidden_out``, judges its last position."""

    def __init__(self, head: ExitHead):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor):
        return self.head(hidden[:, -1, :])


class _SegmentBase(nn.Module):
    """What both segment forms share: the layers, the optional embedding, exit classifier and
    final head, and the order of the outputs."""

    def __init__(self, layers, embed: nn.Embedding | None, head: "FinalHead | None", emit_hidden: bool,
                 classifier: ExitClassifier | None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.embed = embed
        self.head = head
        self.emit_hidden = emit_hidden
        self.classifier = classifier

    def _outputs(self, x: torch.Tensor, presents: list[torch.Tensor]) -> tuple:
        outputs = [x] if self.emit_hidden else []
        if self.classifier is not None:
            outputs.append(self.classifier(x[:, -1, :]))
        if self.head is not None:
            outputs += list(self.head(x if self.head.every_position else x[:, -1, :]))
        return tuple(outputs + presents)


class Segment(_SegmentBase):
    """Layers [start, stop) of the backbone; the last segment also holds the final head."""

    def __init__(
        self,
        layers: list[DecoderLayer],
        inv_freq: torch.Tensor,
        rope_scaling: float,
        embed: nn.Embedding | None,
        head: FinalHead | None,
        emit_hidden: bool,
        classifier: ExitClassifier | None = None,
    ):
        super().__init__(layers, embed, head, emit_hidden, classifier)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.rope_scaling = float(rope_scaling)

    def _rotary_and_mask(self, x, position_ids, attention_mask):
        seq = x.shape[1]
        total = attention_mask.shape[1]
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(x.dtype)[:, None, :, :]
        sin = (emb.sin() * self.rope_scaling).to(x.dtype)[:, None, :, :]
        # Query i sits at absolute index total - seq + i; it sees keys at or
        # before it that the attention mask keeps.
        q_idx = torch.arange(seq, device=x.device) + (total - seq)
        k_idx = torch.arange(total, device=x.device)
        causal = k_idx[None, :] <= q_idx[:, None]
        return cos, sin, causal[None, :, :] & attention_mask[:, None, :].bool()

    def forward(self, x, position_ids, attention_mask, *past):
        if self.embed is not None:
            x = self.embed(x)
        cos, sin, allowed = self._rotary_and_mask(x, position_ids, attention_mask)
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, allowed, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return self._outputs(x, presents)

    def fill(self, hidden, position_ids, attention_mask, past) -> list[torch.Tensor]:
        cos, sin, allowed = self._rotary_and_mask(hidden, position_ids, attention_mask)
        presents = []
        for i, layer in enumerate(self.layers):
            _, k, v = layer.attn(layer.input_norm(hidden), cos, sin, allowed, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return presents


def rotary_cache(inv_freq: torch.Tensor, scaling: float, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim / 2] for positions 0..length-1, as GroupQueryAttention reads them."""
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return freqs.cos() * scaling, freqs.sin() * scaling


class OrtSegment(_SegmentBase):
    """`Segment` in onnxruntime's contrib kernels (`eec.compiler.ops`); same inputs and outputs.

    ``position_ids`` is accepted for the common interface; GroupQueryAttention
    derives positions from the KV length, which the runtime keeps equal.
    """

    def __init__(
        self,
        layers: list[OrtDecoderLayer],
        inv_freq: torch.Tensor,
        rope_scaling: float,
        context: int,
        embed: nn.Embedding | None,
        head: FinalHead | None,
        emit_hidden: bool,
        classifier: ExitClassifier | None = None,
    ):
        super().__init__(layers, embed, head, emit_hidden, classifier)
        cos, sin = rotary_cache(inv_freq, rope_scaling, context)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def forward(self, x, position_ids, attention_mask, *past):
        if self.embed is not None:
            x = self.embed(x)
        first = self.layers[0].input_norm
        normed, residual = ops.rms_norm(x, first.weight, first.eps), x
        presents = []
        for i, layer in enumerate(self.layers):
            out, residual, k, v = layer(normed, residual, self.cos_cache, self.sin_cache, attention_mask,
                                        past[2 * i], past[2 * i + 1])
            presents += [k, v]
            if i + 1 < len(self.layers):
                nxt = self.layers[i + 1].input_norm
                normed, residual = ops.skip_rms_norm(out, residual, nxt.weight, nxt.eps)
            else:
                x = residual + out
        return self._outputs(x, presents)

    def fill(self, hidden, position_ids, attention_mask, past) -> list[torch.Tensor]:
        presents = []
        for i, layer in enumerate(self.layers):
            qkv = layer.attn.qkv(ops.rms_norm(hidden, layer.input_norm.weight, layer.input_norm.eps))
            _, k, v = ops.gqa(qkv, past[2 * i], past[2 * i + 1], attention_mask, self.cos_cache, self.sin_cache,
                              layer.attn.n_heads, layer.attn.n_kv_heads)
            presents += [k, v]
        return presents


class KVFill(nn.Module):
    """Keys and values of a segment's layers for positions that left at an earlier exit,
    every layer reading that exit's hidden state (CALM's state propagation).

    The exact catch-up runs the whole segment over those positions; this runs
    each layer's norm and key/value projection only (the query, attention
    output, output projection and MLP fall away when exported). The first
    layer's keys and values are exact (its input is that hidden state); deeper
    layers' approximate what the full model would compute. Same inputs as the
    segment; outputs its presents.
    """

    def __init__(self, segment: "Segment | OrtSegment"):
        super().__init__()
        self.segment = segment

    def forward(self, hidden, position_ids, attention_mask, *past):
        return tuple(self.segment.fill(hidden, position_ids, attention_mask, past))
