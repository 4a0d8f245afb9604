"""Exit heads as trainable modules, and Valade's loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from eec.compiler.checkpoint import HeadWeights

INITS = ("copy", "fresh")


class TrainableHead(nn.Module):
    """RMSNorm then a projection to the vocabulary: the `norm+linear` head kind."""

    def __init__(self, hidden: int, vocab: int, eps: float):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(hidden))
        self.proj = nn.Linear(hidden, vocab, bias=False)
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.proj(self.norm_weight * h)

    def to_weights(self, layer: int) -> HeadWeights:
        return HeadWeights(layer, "norm+linear", self.norm_weight.detach().clone(), self.proj.weight.detach().clone())


def new_head(model, init: str, generator: torch.Generator) -> TrainableHead:
    """A head initialised from a copy of the final norm and LM head, or fresh."""
    c = model.config
    head = TrainableHead(c.hidden_size, c.vocab_size, c.rms_norm_eps)
    with torch.no_grad():
        if init == "copy":
            head.norm_weight.copy_(model.model.norm.weight)
            head.proj.weight.copy_(model.lm_head.weight)
        else:
            head.proj.weight.normal_(0.0, c.hidden_size**-0.5, generator=generator)
    return head


def valade_loss(logits: torch.Tensor, top_index: torch.Tensor, top_logp: torch.Tensor, lam: float) -> torch.Tensor:
    """(1 - λ)·CE(p_k, p_θ) − λ·H(p_k), mean over tokens (seed 002, eq. 1).

    p_θ is known through its top-k; the remaining mass r is one bucket, matched
    against the head's mass outside those k tokens.
    """
    logq = F.log_softmax(logits.float(), dim=-1)
    p_top = top_logp.exp()
    rest = (1.0 - p_top.sum(-1)).clamp(min=0.0)
    logq_top = logq.gather(-1, top_index)
    q_rest = (1.0 - logq_top.exp().sum(-1)).clamp(min=1e-12)
    ce = -(p_top * logq_top).sum(-1) - rest * q_rest.log()
    entropy = -(logq.exp() * logq).sum(-1)
    return ((1.0 - lam) * ce - lam * entropy).mean()
