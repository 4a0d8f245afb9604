"""Contrib operators: PyTorch custom ops whose ONNX form is one onnxruntime (contrib) kernel.

The dynamo exporter turns a plain-PyTorch decoder layer into ~60 small ONNX
nodes (reshapes, transposes, slices, the rotary arithmetic, the masked
softmax); on a 135M model at one token per step their per-node overhead costs
more than the matrix products (measured: docs/design-notes.md). Each op here
has an eager PyTorch implementation, which is the reference the exported
graph is checked against, and a translation to onnxruntime's contrib kernel:

    eec::skip_rms_norm      -> com.microsoft.SkipSimplifiedLayerNormalization
    eec::gqa                -> com.microsoft.GroupQueryAttention (rotary inside)
    eec::encoder_attention  -> com.microsoft.Attention (packed QKV, a padding mask; encoders)
    eec::embed_layer_norm   -> com.microsoft.EmbedLayerNormalization (an encoder's embeddings)

Only onnxruntime runs these kernels, so targets whose backend is TensorRT
export the plain graph instead (`Target.contrib_ops`).
"""

from __future__ import annotations

import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset20 as op

MSFT = onnxscript.values.Opset("com.microsoft", 1)


def _schema(name: str, inputs: list[str], outputs: list[str], attributes: dict[str, str]) -> OpSchema:
    """The part of a contrib op's schema the exporter needs: the onnx package
    knows only standard ops, and onnxscript binds arguments by schema."""
    optional = OpSchema.FormalParameterOption.Optional
    kinds = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}

    def params(names):
        return [OpSchema.FormalParameter(n.rstrip("?"), "T", param_option=optional if n.endswith("?") else
                                         OpSchema.FormalParameterOption.Single, is_homogeneous=False) for n in names]

    return OpSchema(
        name, MSFT.domain, 1, inputs=params(inputs), outputs=params(outputs),
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(int32)", "tensor(int64)"], "")],
        attributes=[OpSchema.Attribute(a, kinds[t], "", required=False) for a, t in attributes.items()],
    )


_SKIP_RMS_NORM = _schema("SkipSimplifiedLayerNormalization", ["input", "skip", "gamma", "bias?"],
                         ["output", "mean?", "inv_std_var?", "input_skip_bias_sum?"], {"epsilon": "float"})
_GQA = _schema(
    "GroupQueryAttention",
    ["query", "key?", "value?", "past_key?", "past_value?", "seqlens_k", "total_sequence_length", "cos_cache?",
     "sin_cache?"],
    ["output", "present_key", "present_value"],
    {"num_heads": "int", "kv_num_heads": "int", "do_rotary": "int", "rotary_interleaved": "int", "scale": "float"},
)

_ATTENTION = _schema("Attention", ["input", "weights", "bias?", "mask_index?", "past?", "attention_bias?",
                                   "past_sequence_length?"], ["output", "present?"], {"num_heads": "int",
                                                                                      "scale": "float"})

_EMBED_LAYER_NORM = _schema("EmbedLayerNormalization", ["input_ids", "segment_ids?", "word_embedding",
                                                        "position_embedding", "segment_embedding?", "gamma", "beta",
                                                        "mask?", "position_ids?"],
                            ["output", "mask_index?"], {"epsilon": "float"})


def _msft(schema: OpSchema) -> onnxscript.values.Op:
    return onnxscript.values.Op(MSFT, schema.name, schema)

FLOAT, INT32 = 1, 6  # onnx.TensorProto data types

# GroupQueryAttention's CPU kernel applies rotary only for these head sizes.
GQA_HEAD_DIM_MULTIPLE = 16


def gqa_supported(head_dim: int) -> bool:
    return head_dim % GQA_HEAD_DIM_MULTIPLE == 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Plain ops: SimplifiedLayerNormalization has no ONNX schema at opset 20. Written as a
    # division by the square root, the pattern onnxruntime's optimizer fuses into that kernel
    # (Pow, ReduceMean, Add, Sqrt, Div, Mul); rsqrt exports as Reciprocal, which it does not match.
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x / torch.sqrt(variance + eps))


@torch.library.custom_op("eec::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + skip), x + skip): a residual add and the next norm in one kernel."""
    total = x + skip
    return rms_norm(total, weight, eps), total


@skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * torch.cat((cos, cos), -1) + rotated * torch.cat((sin, sin), -1)


@torch.library.custom_op("eec::gqa", mutates_args=())
def gqa(
    qkv: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    attention_mask: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    num_heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal grouped-query attention with rotary embedding, GroupQueryAttention's contract.

    qkv [batch, seq, (heads + 2 * kv_heads) * dim]: queries, keys and values
    packed, before rotary (the kernel reads them in place: no split); past
    [batch, kv_heads, past, dim]; the attention mask is all ones over ``past + seq`` (the runtime decodes one unpadded sequence), so query
    i sits at position ``past + i``. Returns the output [batch, seq,
    heads*dim] and the presents [batch, kv_heads, past + seq, dim].
    """
    bsz, seq, _ = qkv.shape
    dim = past_k.shape[-1]
    past = past_k.shape[2]
    q, k, v = qkv.split([num_heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    positions = torch.arange(past, past + seq)
    cos, sin = cos_cache[positions][None, None], sin_cache[positions][None, None]
    q = _rotate(q.view(bsz, seq, num_heads, dim).transpose(1, 2), cos, sin)
    k = _rotate(k.view(bsz, seq, kv_heads, dim).transpose(1, 2), cos, sin)
    v = v.view(bsz, seq, kv_heads, dim).transpose(1, 2)
    k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    group = num_heads // kv_heads
    scores = torch.matmul(q, k.repeat_interleave(group, 1).transpose(2, 3)) * dim**-0.5
    causal = torch.arange(past + seq)[None, :] <= positions[:, None]
    scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    out = torch.matmul(torch.softmax(scores, -1), v.repeat_interleave(group, 1))
    return out.transpose(1, 2).reshape(bsz, seq, num_heads * dim), k, v


@gqa.register_fake
def _(qkv, past_k, past_v, attention_mask, cos_cache, sin_cache, num_heads, kv_heads):
    bsz, seq, _ = qkv.shape
    dim = past_k.shape[-1]
    total = past_k.shape[2] + seq
    present = past_k.new_empty(bsz, kv_heads, total, dim)
    return qkv.new_empty(bsz, seq, num_heads * dim), present, torch.empty_like(present)


@torch.library.custom_op("eec::encoder_attention", mutates_args=())
def encoder_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, attention_mask: torch.Tensor,
                      num_heads: int) -> torch.Tensor:
    """Bidirectional multi-head self-attention over a padded batch, the Attention kernel's contract.

    x [batch, seq, hidden]; weight [hidden, 3 * hidden] and bias [3 * hidden]: the query, key and value
    projections packed (x @ weight + bias); attention_mask [batch, seq], 1 for a token and 0 for padding
    (padded keys get no weight). Returns the heads' outputs [batch, seq, hidden], before the output
    projection. Written out once, as BERT-family encoders compute it: onnxruntime's transformer
    optimizer fuses attention only in TorchScript exports of whole models, and this is what its fusion
    produces, for the segments the dynamo exporter writes.
    """
    bsz, seq, hidden = x.shape
    dim = hidden // num_heads
    q, k, v = (x @ weight + bias).view(bsz, seq, 3, num_heads, dim).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) * dim**-0.5
    scores = scores + (1.0 - attention_mask[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
    return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(bsz, seq, hidden)


@encoder_attention.register_fake
def _(x, weight, bias, attention_mask, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op("eec::embed_layer_norm", mutates_args=())
def embed_layer_norm(ids: torch.Tensor, word: torch.Tensor, position: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor, eps: float) -> torch.Tensor:
    """An encoder's embeddings: layer_norm(word[ids] + position[:seq]), ids [batch, seq] -> [batch, seq, width].

    ``position`` holds each position's embedding with any fixed per-token term added in (BERT's token type
    0); one kernel on onnxruntime in place of the ~10 small nodes the exporter writes for a Hugging Face
    embeddings module (measured on a 6-layer BERT at 70 tokens, 2 cores: the first segment 44 µs faster
    in a slow spell of the machine, about 10% of it)."""
    seq = ids.shape[1]
    return torch.nn.functional.layer_norm(word[ids] + position[:seq], (word.shape[1],), weight, bias, eps)


@embed_layer_norm.register_fake
def _(ids, word, position, weight, bias, eps):
    return word.new_empty(ids.shape[0], ids.shape[1], word.shape[1])


def _embed_layer_norm_onnx(ids, word, position, weight, bias, eps: float):
    output, _ = _msft(_EMBED_LAYER_NORM)(op.Cast(ids, to=INT32), None, word, position, None, weight, bias,
                                         epsilon=eps, _num_outputs=2)
    return output


def _encoder_attention_onnx(x, weight, bias, attention_mask, num_heads: int):
    # mask_index of shape [batch, seq] is the raw 0/1 padding mask, in int32
    output, _ = _msft(_ATTENTION)(x, weight, bias, op.Cast(attention_mask, to=INT32), num_heads=num_heads,
                                  _num_outputs=2)
    return output


def _skip_rms_norm_onnx(x, skip, weight, eps: float):
    normed, _, _, total = _msft(_SKIP_RMS_NORM)(x, skip, weight, epsilon=eps, _num_outputs=4)
    return normed, total


def _gqa_onnx(qkv, past_k, past_v, attention_mask, cos_cache, sin_cache, num_heads: int, kv_heads: int):
    seqlens_k = op.Cast(op.Sub(op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0),
                               op.Constant(value_int=1)), to=INT32)
    total = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2)), to=INT32)
    return _msft(_GQA)(
        qkv, None, None, past_k, past_v, seqlens_k, total, cos_cache, sin_cache,
        num_heads=num_heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, _num_outputs=3,
    )


TRANSLATIONS = {
    torch.ops.eec.skip_rms_norm.default: _skip_rms_norm_onnx,
    torch.ops.eec.gqa.default: _gqa_onnx,
    torch.ops.eec.encoder_attention.default: _encoder_attention_onnx,
    torch.ops.eec.embed_layer_norm.default: _embed_layer_norm_onnx,
}
