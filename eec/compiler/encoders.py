"""BERT-family sequence classifiers (BERT, RoBERTa, DistilBERT, ELECTRA, ALBERT) as segments with exits.

A Hugging Face ``*ForSequenceClassification`` directory is cut after the
exit layers. Each segment takes the token ids (the first) or the previous
segment's hidden state, and the padding mask; an exit's head reuses the
model's own classifier on that layer's hidden state (BERT: the pooler and the
classifier; RoBERTa: its classification head; DistilBERT: pre-classifier,
ReLU, classifier), as decoders reuse their LM head, unless trained heads are
given (`eec train` on a classifier).

The layers are rebuilt from the model's weights with attention as one
onnxruntime kernel (`eec.compiler.ops.encoder_attention`: packed QKV and the
padding mask), and the embeddings as another (`TokenEmbeddings`); the layer
norms, GELU and linear layers are PyTorch's own, which onnxruntime fuses
(SkipLayerNormalization, BiasGelu) when it opens the graph. Every segment is
checked against the model itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from eec.compiler.ops import embed_layer_norm, encoder_attention
from eec.errors import InputError, UnsupportedModelError

FAMILIES = ("bert", "roberta", "distilbert", "electra", "albert")


@dataclass
class SourceEncoder:
    model: nn.Module  # transformers' *ForSequenceClassification, eval mode
    family: str
    tokenizer_json: str  # the fast tokenizer's tokenizer.json
    source: str
    heads: dict[int, nn.Module] = field(default_factory=dict)  # trained exit heads by layer (`eec train`)
    learned_exit: nn.Module | None = None  # BERxiT's learning-to-exit module, shared by every exit

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        c = self.config
        return c.n_layers if self.family == "distilbert" else c.num_hidden_layers

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @property
    def hidden_size(self) -> int:
        return layer_width(self.config, self.family)

    @property
    def max_length(self) -> int:
        """Longest input, special tokens included: RoBERTa's positions start after the padding index."""
        c = self.config
        return c.max_position_embeddings - (c.pad_token_id + 1 if self.family == "roberta" else 0)

    @property
    def pad_id(self) -> int:
        return int(self.config.pad_token_id if self.config.pad_token_id is not None else 0)

    @property
    def class_names(self) -> list[str] | None:
        names = [self.config.id2label.get(i) for i in range(self.num_labels)]
        default = [f"LABEL_{i}" for i in range(self.num_labels)]
        return None if names == default or any(n is None for n in names) else [str(n) for n in names]

    def backbone(self) -> nn.Module:
        return getattr(self.model, self.family)  # transformers names the backbone after the architecture

    def hf_layers(self) -> list[nn.Module]:
        """One module per layer, in order. ALBERT shares its layers' weights: layer i runs group
        i // (layers / groups), so the same module appears several times (the artifact stores its
        weights once: `eec.compiler.weights.store_weights_once`)."""
        body = self.backbone()
        if self.family == "albert":  # one layer a group (`check_family`)
            c = self.config
            per_group = c.num_hidden_layers // c.num_hidden_groups
            return [body.encoder.albert_layer_groups[i // per_group].albert_layers[0] for i in range(c.num_hidden_layers)]
        return list(body.transformer.layer if self.family == "distilbert" else body.encoder.layer)


def layer_width(config, family: str) -> int:
    """The width of the layers' hidden state (ELECTRA's and ALBERT's embeddings may be narrower: projected up)."""
    return config.dim if family == "distilbert" else config.hidden_size


def check_family(config) -> None:
    """Refuse, when the model is read, an architecture eec does not cut."""
    family = config.model_type
    if family not in FAMILIES:
        raise UnsupportedModelError(f"classifier architecture {family!r} is not supported; eec compiles sequence "
                                    f"classifiers of {', '.join(FAMILIES)}")
    if family == "albert" and (config.inner_group_num != 1 or config.num_hidden_layers % config.num_hidden_groups):
        raise UnsupportedModelError(f"ALBERT with {config.inner_group_num} layers a group and {config.num_hidden_groups} "
                                    f"groups for {config.num_hidden_layers} layers: eec cuts ALBERT with one layer a "
                                    "group (every released ALBERT)")


def is_encoder_dir(path: str | Path) -> bool:
    """A Hugging Face directory whose config names a sequence-classification architecture."""
    path = Path(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def load_encoder(path: str | Path) -> SourceEncoder:
    """A local ``*ForSequenceClassification`` directory with a fast tokenizer (tokenizer.json)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_family(config)
    if not (path / "tokenizer.json").is_file():
        raise InputError(f"{path} has no tokenizer.json: eec needs the model's fast tokenizer (save it with "
                         "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(...))")
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    if getattr(model.config, "problem_type", None) == "regression" or model.config.num_labels < 2:
        raise UnsupportedModelError("eec compiles classifiers with at least 2 labels; this model is a regression")
    return SourceEncoder(model, config.model_type, (path / "tokenizer.json").read_text(encoding="utf-8"), str(path))


def is_encoder_checkpoint(path: str | Path) -> bool:
    """A file from `eec train` on a text classifier (`eec.train.encoder.save_checkpoint`)."""
    from eec.train.encoder import CHECKPOINT_FORMAT

    raw = _read_checkpoint(Path(path))
    return isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT


def _read_checkpoint(path: Path):
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint (or a pickle)
        return None


def load_encoder_checkpoint(path: str | Path) -> SourceEncoder:
    """The fine-tuned model, tokenizer and trained exit heads `eec train` wrote, read without unpickling code."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from eec.train.encoder import CHECKPOINT_VERSION, HEAD_KIND, LEARNED_EXIT_KIND, ExitHead, LearnedExit

    path = Path(path)
    raw = _read_checkpoint(path)
    if not isinstance(raw, dict) or raw.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{path}: not a text classifier checkpoint of version {CHECKPOINT_VERSION}")
    try:
        config = dict(raw["base"]["config"])
        family = config.get("model_type")
        if family not in FAMILIES:  # before transformers builds a config of any architecture it knows
            raise UnsupportedModelError(f"classifier architecture {family!r} is not supported; eec compiles sequence "
                                        f"classifiers of {', '.join(FAMILIES)}")
        config = AutoConfig.for_model(**config)
        check_family(config)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
        model.load_state_dict(raw["base"]["state_dict"], strict=True)
        tokenizer = raw["tokenizer"]["json"]
        hidden = layer_width(config, family)
        heads = {}
        for entry in raw["exits"]:
            if entry["kind"] != HEAD_KIND:
                raise InputError(f"{path}: exit head kind {entry['kind']!r} is not one eec knows ({HEAD_KIND})")
            head = ExitHead(hidden, config.num_labels)
            head.load_state_dict(entry["state_dict"], strict=True)
            heads[int(entry["layer"])] = head.eval()
        learned = None
        if raw.get("learned_exit") is not None:
            if raw["learned_exit"]["kind"] != LEARNED_EXIT_KIND:
                raise InputError(f"{path}: learned exit kind {raw['learned_exit']['kind']!r} is not one eec knows")
            learned = LearnedExit(hidden)
            learned.load_state_dict(raw["learned_exit"]["state_dict"], strict=True)
            learned.eval()
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{path}: a malformed text classifier checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(tokenizer, str):
        raise InputError(f"{path}: the checkpoint's tokenizer must be tokenizer.json text")
    src = SourceEncoder(model.eval(), family, tokenizer, str(path), heads, learned)
    bad = [k for k in heads if not 1 <= k < src.num_layers]
    if bad:
        raise InputError(f"{path}: exit heads at layers {bad}, outside 1..{src.num_layers - 1}")
    return src


class EncoderLayer(nn.Module):
    """A post-norm transformer encoder layer on the model's own weights, attention as one kernel."""

    def __init__(self, layer: nn.Module, family: str, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        if family == "distilbert":
            a = layer.attention
            q, k, v, self.out = a.q_lin, a.k_lin, a.v_lin, a.out_lin
            self.norm1, self.norm2 = layer.sa_layer_norm, layer.output_layer_norm
            self.up, self.act, self.down = layer.ffn.lin1, layer.ffn.activation, layer.ffn.lin2
        elif family == "albert":
            a = layer.attention
            q, k, v, self.out, self.norm1 = a.query, a.key, a.value, a.dense, a.LayerNorm
            self.up, self.act, self.down = layer.ffn, layer.activation, layer.ffn_output
            self.norm2 = layer.full_layer_layer_norm
        else:
            a = layer.attention
            q, k, v = a.self.query, a.self.key, a.self.value
            self.out, self.norm1 = a.output.dense, a.output.LayerNorm
            self.up, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
            self.down, self.norm2 = layer.output.dense, layer.output.LayerNorm
        self.register_buffer("qkv_weight", torch.cat([q.weight, k.weight, v.weight]).t().contiguous(), persistent=False)
        self.register_buffer("qkv_bias", torch.cat([q.bias, k.bias, v.bias]), persistent=False)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        a = encoder_attention(h, self.qkv_weight, self.qkv_bias, attention_mask, self.num_heads)
        h = self.norm1(h + self.out(a))
        return self.norm2(h + self.down(self.act(self.up(h))))


class TokenEmbeddings(nn.Module):
    """The model's embeddings as one kernel (`eec.compiler.ops.embed_layer_norm`): word and position
    embeddings, token type 0's embedding added into every position's (eec feeds no token types), and
    the layer norm. RoBERTa's positions start after the padding index: right-padded, its tokens sit at
    positions padding_idx + 1 on, so the table is read from there (a pad's own position differs, and a
    pad's state is never read)."""

    def __init__(self, src: SourceEncoder):
        super().__init__()
        e = src.backbone().embeddings
        position = e.position_embeddings.weight.detach()
        if src.family == "roberta":
            position = position[src.pad_id + 1:]
        types = getattr(e, "token_type_embeddings", None)
        if types is not None:
            position = position + types.weight.detach()[0]
        self.register_buffer("word", e.word_embeddings.weight.detach().clone(), persistent=False)
        self.register_buffer("position", position.contiguous().clone(), persistent=False)
        self.register_buffer("weight", e.LayerNorm.weight.detach().clone(), persistent=False)
        self.register_buffer("bias", e.LayerNorm.bias.detach().clone(), persistent=False)
        self.eps = float(e.LayerNorm.eps)

    @staticmethod
    def supports(src: SourceEncoder) -> bool:
        """Absolute position embeddings (every family's default); others keep transformers' own module."""
        return getattr(src.config, "position_embedding_type", "absolute") == "absolute"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embed_layer_norm(ids, self.word, self.position, self.weight, self.bias, self.eps)


class SharedHead(nn.Module):
    """The model's own classifier on a layer's hidden state: logits from the first token's state."""

    def __init__(self, src: SourceEncoder):
        super().__init__()
        m = src.model
        self.family = src.family
        if src.family == "bert":
            self.pooler, self.classifier = m.bert.pooler, m.classifier
        elif src.family == "albert":
            self.pooler = nn.Sequential(m.albert.pooler, m.albert.pooler_activation)  # on the first token
            self.classifier = m.classifier
        elif src.family in ("roberta", "electra"):
            self.classifier = m.classifier  # dense, tanh (ELECTRA: gelu), out_proj on the first token
        else:
            self.pre, self.classifier = m.pre_classifier, m.classifier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.family == "bert":
            return self.classifier(self.pooler(h))
        if self.family == "albert":
            return self.classifier(self.pooler(h[:, 0]))
        if self.family in ("roberta", "electra"):
            return self.classifier(h)
        return self.classifier(torch.relu(self.pre(h[:, 0])))


class EncoderSegment(nn.Module):
    """Layers ``start..stop-1`` (after the embeddings, for the first) and optionally a head at their end.

    forward(x, attention_mask): x is the token ids [batch, seq] for the first segment, else the hidden
    state [batch, seq, hidden]; returns the hidden state and, with a head, the class probabilities and label
    (the last segment: probabilities and label only), and with a learned exit its score."""

    def __init__(self, src: SourceEncoder, start: int, stop: int, head: nn.Module | None, keep_hidden: bool = True,
                 learned_exit: nn.Module | None = None):
        super().__init__()
        heads = src.config.n_heads if src.family == "distilbert" else src.config.num_attention_heads
        self.family = src.family
        self.embeddings = None if start else TokenEmbeddings(src) if TokenEmbeddings.supports(src) \
            else src.backbone().embeddings
        # ELECTRA's and ALBERT's embeddings narrower than their layers: their own projection up
        project = (src.backbone().encoder.embedding_hidden_mapping_in if src.family == "albert"
                   else getattr(src.backbone(), "embeddings_project", None))
        self.project = project if start == 0 else None
        self.layers = nn.ModuleList(EncoderLayer(l, src.family, heads) for l in src.hf_layers()[start:stop])
        self.head, self.keep_hidden, self.learned_exit = head, keep_hidden, learned_exit

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor):
        h = x
        if self.embeddings is not None:
            h = self.embeddings(x) if isinstance(self.embeddings, TokenEmbeddings) or self.family == "distilbert" \
                else self.embeddings(input_ids=x, token_type_ids=torch.zeros_like(x))
            if self.project is not None:
                h = self.project(h)
        for layer in self.layers:
            h = layer(h, attention_mask)
        if self.head is None:
            return h
        probs = torch.softmax(self.head(h), -1)
        label = probs.argmax(-1)
        if self.learned_exit is not None:
            return h, probs, label, self.learned_exit(h)
        return (h, probs, label) if self.keep_hidden else (probs, label)
