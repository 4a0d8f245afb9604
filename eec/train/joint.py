"""Joint mode: fine-tune the backbone together with the exit heads.

The loss is CALM's layer-weighted sum over the exits and the final layer,
with weights growing with depth (w_i ∝ i, the layer index), each term
Valade's loss against the *frozen original* model's distribution (top-k plus
the rest). The final layer's term is distillation from the original, so that
intermediate layers become better exits while the final output stays close
to what the user had. What the user loses is measured: the fine-tuned final
layer's agreement with the original on held-out tokens.

Layer dropout (LayerSkip, Elhoushi et al. 2024): in each training batch,
layer l of L is skipped (its input passed on unchanged) with probability
``layer_drop * l / (L - 1)``, rising with depth, so later layers learn to
refine rather than rewrite and earlier layers carry more of the prediction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from eec.train.data import TrainingData
from eec.train.heads import TrainableHead, valade_loss


@dataclass
class JointReport:
    final_agreement: float  # fine-tuned final layer vs the original, held-out tokens
    exit_agreement: dict[int, float]  # each exit vs the original's token, held-out tokens
    exit_agreement_before: dict[int, float]
    final_loss: float
    epochs_run: int  # epochs kept; fewer than asked when the floor stopped training
    stopped_at_floor: bool
    undone_final_agreement: float | None = None  # what the epoch the floor undid had taken it to


def layer_weights(exits: list[int], num_layers: int) -> dict[int, float]:
    """CALM's depth-growing weights over the exits and the final layer, summing to 1."""
    layers = [*exits, num_layers]
    total = sum(layers)
    return {layer: layer / total for layer in layers}


class LayerDrop:
    """Skips decoder layers at random while the model trains (forward hooks that return the layer's input)."""

    def __init__(self, model, rate: float, generator: torch.Generator):
        layers = model.model.layers
        n = len(layers)
        self.p = [rate * i / max(n - 1, 1) for i in range(n)]
        self.generator, self.model = generator, model
        self.skip = [False] * n
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)] if rate > 0 else []

    def _hook(self, i: int):
        def hook(module, args, output):
            return args[0] if self.model.training and self.skip[i] else output
        return hook

    def resample(self) -> None:
        draws = torch.rand(len(self.p), generator=self.generator).tolist()
        self.skip = [d < p for d, p in zip(draws, self.p)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _forward(student, heads: dict[int, TrainableHead], batch) -> dict[int, torch.Tensor]:
    ids, mask, positions, rows = batch
    out = student(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    logits = {layer: head(out.hidden_states[layer][rows]) for layer, head in heads.items()}
    logits[student.config.num_hidden_layers] = out.logits[rows]
    return logits


def _agreement(student, heads, data: TrainingData, is_val: torch.Tensor) -> dict[int, float]:
    hits: dict[int, int] = {}
    offset = 0
    with torch.no_grad():
        for batch in data.batches:
            n = int(batch[3].sum())
            val = is_val[offset : offset + n]
            target = data.target[offset : offset + n][val]
            for layer, logits in _forward(student, heads, batch).items():
                hits[layer] = hits.get(layer, 0) + int((logits[val].argmax(-1) == target).sum())
            offset += n
    count = max(int(is_val.sum()), 1)
    return {layer: h / count for layer, h in hits.items()}


def train_joint(model, heads: dict[int, TrainableHead], data: TrainingData, is_val: torch.Tensor, *, lam: float,
                epochs: int, lr: float, backbone_lr: float, generator: torch.Generator, floor: float = 0.0,
                layer_drop: float = 0.0, on_step: Callable[[float], None] = lambda _: None):
    """Fine-tune a copy of ``model`` and ``heads`` in place; return (student, report).

    After each epoch the fine-tuned final layer's held-out agreement with the
    original is measured; an epoch that takes it below ``floor`` is undone and
    training stops there. ``layer_drop``: the deepest layer's skip
    probability (LayerSkip); 0 trains every layer on every batch.
    """
    student = copy.deepcopy(model).train()
    for p in student.parameters():
        p.requires_grad_(True)
    n_layers = model.config.num_hidden_layers
    weights = layer_weights(sorted(heads), n_layers)
    student.eval()  # dropout and layer drop off while measuring
    before = _agreement(student, heads, data, is_val)
    student.train()
    drop = LayerDrop(student, layer_drop, generator)
    head_params = [p for h in heads.values() for p in h.parameters()]
    optimizer = torch.optim.AdamW([{"params": list(student.parameters()), "lr": backbone_lr},
                                   {"params": head_params, "lr": lr}], weight_decay=0.0)
    offsets = torch.tensor([0] + [int(b[3].sum()) for b in data.batches]).cumsum(0)
    loss_value = float("nan")
    epochs_run, stopped, undone = 0, False, None
    for _ in range(epochs):
        if floor > 0:
            snapshot = copy.deepcopy((student.state_dict(), {k: h.state_dict() for k, h in heads.items()}))
        for b in torch.randperm(len(data.batches), generator=generator).tolist():
            start, stop = int(offsets[b]), int(offsets[b + 1])
            train_rows = ~is_val[start:stop]
            if not train_rows.any():
                continue
            idx, logp = data.top_index[start:stop][train_rows], data.top_logp[start:stop][train_rows]
            drop.resample()
            logits = _forward(student, heads, data.batches[b])
            loss = sum(w * valade_loss(logits[layer][train_rows], idx, logp, lam if layer < n_layers else 0.0)
                       for layer, w in weights.items())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            on_step(loss_value)
        student.eval()
        reached = _agreement(student, heads, data, is_val)[n_layers] if floor > 0 else 1.0
        student.train()
        if reached < floor:
            student.load_state_dict(snapshot[0])
            for k, h in heads.items():
                h.load_state_dict(snapshot[1][k])
            stopped, undone = True, reached
            break
        epochs_run += 1
    drop.remove()
    student.eval()
    after = _agreement(student, heads, data, is_val)
    report = JointReport(
        final_agreement=after.pop(n_layers),
        exit_agreement=after,
        exit_agreement_before={k: v for k, v in before.items() if k != n_layers},
        final_loss=loss_value,
        epochs_run=epochs_run,
        stopped_at_floor=stopped,
        undone_final_agreement=undone,
    )
    return student, report
