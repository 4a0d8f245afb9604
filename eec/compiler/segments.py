"""Plan the segments from the exit layers and build their PyTorch modules.

Rules:
1. Exits are layer indices in ``1 .. num_layers - 1``, each at most once;
   an exit at ``b`` reads the hidden state after ``b`` layers.
2. The backbone is cut at every exit: ``[0, e1), [e1, e2), ..., [ek, L)``.
3. Segment 0 takes ``input_ids`` (the embedding is inside it); the others
   take ``hidden``. Every segment but the last emits ``hidden_out``. Every graph
   lies in `GRAPHS`, whose weights the compiler stores once (`eec.compiler.weights`).
4. The last segment ends with the model's final norm and LM head inside it, and
   returns the token alone (`FinalHead`).
5. With ``fills``, every segment but the first also gets a `KVFill` graph
   (``graphs/fill<i>.onnx``) for the propagating catch-up.
6. Each exit has a head graph of its own that reads the segment's
   ``hidden_out``: the trained head from ``model.pt`` where there is one
   (``graphs/exit<b>.onnx``), else the model's own final norm and LM head
   ("shared", as in CALM and LayerSkip), written once as ``graphs/shared_head.onnx``
   for every exit that uses it.
7. With ``verify`` and at least one exit, the last segment also gets a verify
   graph (``graphs/seg<i>_verify.onnx``): the same layers and inputs, its
   final head returning the token at every position (speculative decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eec.compiler.frontends import SourceModel
from eec.compiler.modules import (
    DecoderLayer,
    ExitClassifier,
    ExitHead,
    FinalHead,
    OrtDecoderLayer,
    OrtSegment,
    KVFill,
    LastPositionHead,
    Segment,
)
from eec.compiler.ops import gqa_supported
from eec.errors import InputError, UnsupportedModelError
from eec.runtime.manifest import FILL, PLAIN, VERIFY, ExitSpec, SegmentSpec


def check_repeats(layers: list[int]) -> None:
    repeated = sorted({x for x in layers if layers.count(x) > 1})
    if repeated:
        raise InputError(f"exit layers repeated: {', '.join(map(str, repeated))}")


def check_exits(layers: list[int], num_layers: int) -> list[int]:
    check_repeats(layers)
    bad = [x for x in layers if not 1 <= x < num_layers]
    if bad:
        raise InputError(
            f"exit layers {', '.join(map(str, bad))} out of range: this model has {num_layers} layers, "
            f"so exits go at 1..{num_layers - 1}"
        )
    return sorted(layers)


def default_exits(src: SourceModel) -> list[int]:
    """Trained heads' layers when the checkpoint has them, else quarter depths."""
    if src.heads:
        return sorted(src.heads)
    n = src.config.num_hidden_layers
    return sorted({n * q // 4 for q in (1, 2, 3)} - {0, n})


@dataclass
class PlannedSegment:
    spec: SegmentSpec
    module: Segment
    fill: KVFill | None = None
    verify: Segment | None = None  # the last segment with the token at every position (rule 7)


@dataclass
class PlannedHead:
    file: str
    module: LastPositionHead


@dataclass
class Plan:
    segments: list[PlannedSegment]
    heads: list[PlannedHead]


def io_names(start: int, stop: int, first: bool, last: bool, scored: bool = False) -> tuple[list[str], list[str]]:
    kv_in = [f"past_{kv}_{i}" for i in range(start, stop) for kv in ("key", "value")]
    kv_out = [f"present_{kv}_{i}" for i in range(start, stop) for kv in ("key", "value")]
    inputs = ["input_ids" if first else "hidden", "position_ids", "attention_mask", *kv_in]
    outputs = (["token", *SAMPLE_OUTPUTS] if last else ["hidden_out", *(["exit_score"] if scored else [])]) + kv_out
    return inputs, outputs


def fill_outputs(spec: SegmentSpec) -> list[str]:
    """A segment's `KVFill` graph takes the segment's inputs and returns its presents."""
    return [name for name in spec.outputs if name.startswith("present_")]


GRAPHS = "graphs"  # the folder of an artifact's graphs and their one weights file (rule 3)
SAMPLE_OUTPUTS = ["top_ids", "top_logits"]  # a head's most likely tokens and their logits (`ExitHead.top`)
HEAD_INPUTS, HEAD_OUTPUTS = ["hidden"], ["token", "scores", *SAMPLE_OUTPUTS]


def plan_segments(src: SourceModel, exits: list[int], contrib_ops: bool = False, context: int = 2048,
                  all_heads: bool = True, shortlist: list[int] | None = None,
                  classifiers: dict[int, ExitClassifier] | None = None, fills: bool = False,
                  verify: bool = False) -> Plan:
    """``contrib_ops``: build the segments from onnxruntime's contrib kernels (`eec.compiler.ops`)
    where the model allows it; ``context`` is the longest sequence the rotary cache covers;
    ``all_heads``: refuse exits that leave a trained head out (placement may drop heads);
    ``shortlist``: vocabulary ids every exit head is restricted to (the final head never is);
    ``classifiers``: exit layer -> exit classifier inside, at the end of the segment that ends there;
    ``fills``: a `KVFill` graph for every segment after the first (``--catch-up propagate``);
    ``verify``: a verify graph for the last segment where there are exits (speculative decoding)."""
    classifiers = classifiers or {}
    config = src.config
    n_layers = config.num_hidden_layers
    exits = check_exits(exits, n_layers)
    unused = sorted(set(src.heads) - set(exits))
    if unused and all_heads and exits:  # no exits at all (--exits none) is a choice, not an omission
        raise InputError(
            f"trained heads at layers {', '.join(map(str, unused))} are not among the exits {exits}; "
            "add them to --exits or leave --exits out to use the checkpoint's heads"
        )
    model = src.model
    backbone = model.model
    rotary = backbone.rotary_emb
    if getattr(rotary, "rope_type", "default") in ("dynamic", "longrope"):
        raise UnsupportedModelError(f"rope type {rotary.rope_type!r} changes with sequence length and is not supported")
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    eps = config.rms_norm_eps
    contrib_ops = contrib_ops and gqa_supported(head_dim)

    def shared_head(untie: bool = False) -> ExitHead:
        proj = model.lm_head
        if untie and proj.weight.data_ptr() == backbone.embed_tokens.weight.data_ptr():
            # Tied weights in one graph export as Gather(W) and MatMul(x, Transpose(W)): the weight
            # is then no constant the weight-only quantizer can rewrite, so the head stays fp32.
            proj = nn.Linear(proj.in_features, proj.out_features, bias=False)
            proj.weight = nn.Parameter(model.lm_head.weight.data.clone(), requires_grad=False)
        return ExitHead(backbone.norm.weight.data, eps, proj)

    ids = None if shortlist is None else torch.as_tensor(sorted(shortlist), dtype=torch.int64)

    def exit_head(head: ExitHead) -> LastPositionHead:
        return LastPositionHead(head if ids is None else head.shortlisted(ids))

    heads: dict[str, PlannedHead] = {}
    segments = []
    bounds = [0, *exits, n_layers]
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        first, last = i == 0, stop == n_layers
        if last:
            exit_spec = ExitSpec(stop, "final", None)
        elif stop in src.heads:
            exit_spec = ExitSpec(stop, "trained", f"{GRAPHS}/exit{stop}.onnx", len(ids) if ids is not None else 0)
            heads[exit_spec.file] = PlannedHead(exit_spec.file, exit_head(_trained_head(src.heads[stop], eps)))
        else:
            exit_spec = ExitSpec(stop, "shared", f"{GRAPHS}/shared_head.onnx", len(ids) if ids is not None else 0)
            if exit_spec.file not in heads:
                heads[exit_spec.file] = PlannedHead(exit_spec.file, exit_head(shared_head()))
        classifier = None if last else classifiers.get(stop)
        common = dict(embed=backbone.embed_tokens if first else None, emit_hidden=not last, inv_freq=rotary.inv_freq,
                      rope_scaling=rotary.attention_scaling, classifier=classifier)
        if contrib_ops:
            layers = [OrtDecoderLayer(backbone.layers[j], n_heads, n_kv, head_dim, eps) for j in range(start, stop)]
            common["context"] = context
        else:
            layers = [DecoderLayer(backbone.layers[j], n_heads, n_kv, head_dim, eps) for j in range(start, stop)]
        kind = OrtSegment if contrib_ops else Segment
        module = kind(layers, head=FinalHead(shared_head(untie=first)) if last else None, **common).eval()
        inputs, outputs = io_names(start, stop, first, last, scored=classifier is not None)
        fill = fills and not first
        verified = verify and last and not first
        graphs = {PLAIN: f"{GRAPHS}/seg{i}.onnx"}
        if fill:
            graphs[FILL] = f"{GRAPHS}/fill{i}.onnx"
        if verified:
            graphs[VERIFY] = f"{GRAPHS}/seg{i}_verify.onnx"
        spec = SegmentSpec(graphs, start, stop, inputs, outputs, exit_spec, kv_cache="shared" if contrib_ops else "concat")
        # The verify graph: the same layers, the final head over every position (rule 7).
        every = kind(layers, head=FinalHead(shared_head(), every_position=True), **common).eval() if verified else None
        segments.append(PlannedSegment(spec, module, KVFill(module).eval() if fill else None, every))
    return Plan(segments, [h for h in heads.values()])


def _trained_head(h, eps: float) -> ExitHead:
    proj = nn.Linear(h.proj_weight.shape[1], h.proj_weight.shape[0], bias=h.proj_bias is not None)
    proj.weight = nn.Parameter(h.proj_weight.float(), requires_grad=False)
    if h.proj_bias is not None:
        proj.bias = nn.Parameter(h.proj_bias.float(), requires_grad=False)
    return ExitHead(h.norm_weight.float(), eps, proj)


def exit_head_weights(src: SourceModel, layers: list[int]) -> dict:
    """Each exit's head as numpy arrays (`eec.calib.shortlist.HeadWeights`): the trained head where
    the checkpoint has one, else the model's own final norm and LM head."""
    from eec.calib.shortlist import HeadWeights

    model, eps = src.model, src.config.rms_norm_eps

    def array(t):
        return None if t is None else t.detach().float().numpy()

    weights = {}
    for layer in layers:
        if layer in src.heads:
            h = src.heads[layer]
            weights[layer] = HeadWeights(array(h.norm_weight), eps, array(h.proj_weight), array(h.proj_bias))
        else:
            weights[layer] = HeadWeights(array(model.model.norm.weight), eps, array(model.lm_head.weight),
                                         array(model.lm_head.bias))
    return weights
