"""Exit training for BERT-family text classifiers, by the recipes of the early-exit literature.

Every exit gets its own head (`ExitHead`: a dense layer and tanh on the first
token's state, then a linear layer, as BERT's pooler and classifier), and
each recipe trains them its own way (../shared/seeds/survey-early-exit-nlp.txt):

- ``deebert`` (Xin et al. 2020): stage one fine-tunes the backbone and the
  final classifier on the labels; stage two freezes both and trains the
  exits' heads alone, so the final classifier is exactly stage one's.
- ``pabee`` (Zhou et al. 2020): one stage, every exit and the final
  classifier trained together on the labels, the loss a weighted average
  whose weights grow with depth (weight j at layer j).
- ``fastbert`` (Liu et al. 2020): stage one as DeeBERT's (skipped when the
  texts have no labels: the model's classifier is the teacher as it is);
  stage two freezes the backbone and trains each exit to match the final
  classifier's distribution (KL divergence), so it needs no labels.
- ``berxit`` (Xin et al. 2021): alternating steps, the final classifier's
  loss on even steps and the sum of every exit's on odd ones, both through
  the backbone; on the odd steps its learning-to-exit module (`LearnedExit`)
  also learns, from each exit's state, whether that exit's answer is right
  (squared error against 1 or 0). The artifact's metric ``learned`` exits
  on its estimate.

`train_classifier` writes the checkpoint `eec compile` takes
(`eec.compiler.encoders.load_encoder_checkpoint`: the fine-tuned model, its
tokenizer and the heads, read back with ``torch.load(weights_only=True)``)
and reports held-out accuracy per exit before (the model's own classifier
at each exit) and after.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from eec.errors import InputError

RECIPES = ("deebert", "pabee", "fastbert", "berxit")
CHECKPOINT_FORMAT = "eec-text-classifier"
CHECKPOINT_VERSION = 1
HEAD_KIND = "first-token-tanh-linear"
LEARNED_EXIT_KIND = "first-token-sigmoid"


class ExitHead(nn.Module):
    """Logits from the first token's hidden state: dense, tanh, linear (BERT's pooler and classifier)."""

    def __init__(self, hidden: int, classes: int):
        super().__init__()
        self.dense, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.dense(h[:, 0])))


class LearnedExit(nn.Module):
    """BERxiT's learning-to-exit module: one linear layer and a sigmoid on an exit's first-token state,
    shared by every exit, estimating whether that exit's answer is right."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(h[:, 0])).squeeze(-1)


@dataclass
class ClassifierTrainConfig:
    recipe: str
    exits: list[int]
    epochs: int = 3  # per stage
    lr: float = 5e-5  # the backbone's (AdamW)
    head_lr: float = 1e-3  # the exit heads'
    batch_size: int = 16
    heldout: float = 0.1  # share of the texts held out for the accuracy report, when no held-out file is given
    seed: int = 0


@dataclass
class ClassifierTrainResult:
    exits: list[int]
    accuracy_before: dict[int, float]  # layer -> held-out accuracy (the final layer: the model's classifier)
    accuracy_after: dict[int, float]
    losses: dict[str, list[float]] = field(default_factory=dict)  # stage -> mean loss per epoch
    heldout: int = 0


Progress = Callable[[str, int, int, dict], None]


def _no_progress(what: str, done: int, total: int, figures: dict) -> None:
    pass


def train_classifier(base: str | Path, data: str | Path, out: str | Path, config: ClassifierTrainConfig,
                     heldout: str | Path | None = None, progress: Progress = _no_progress) -> ClassifierTrainResult:
    """Train exits for the sequence classifier directory ``base`` on the texts in ``data`` and write ``out``."""
    from transformers import AutoTokenizer

    from eec.calib.classifier_calibration import read_texts
    from eec.compiler.encoders import load_encoder

    if config.recipe not in RECIPES:
        raise InputError(f"unknown recipe {config.recipe!r}; choose from {', '.join(RECIPES)}")
    if config.epochs < 1 or config.batch_size < 1:
        raise InputError("--epochs and the batch size must be at least 1")
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    src = load_encoder(base)
    layers = src.num_layers
    exits = sorted(set(config.exits))
    bad = [k for k in exits if not 1 <= k < layers]
    if not exits or bad:
        raise InputError(f"--exits {bad or 'none'}: exits sit after 1..{layers - 1} layers (this model has {layers})")
    texts, labels = read_texts(Path(data), src.class_names, src.num_labels)
    if labels is None and config.recipe != "fastbert":
        raise InputError(f"{config.recipe} trains on labels and {data} has none; fastbert trains exits on unlabeled "
                         "text")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    if heldout is not None:
        test_texts, test_labels = read_texts(Path(heldout), src.class_names, src.num_labels)
    else:
        order = list(range(len(texts)))
        rng.shuffle(order)
        cut = max(1, int(len(texts) * config.heldout))
        if len(texts) - cut < 1:
            raise InputError(f"{data} holds too few texts to hold some out; give --heldout")
        test_rows, order = order[:cut], order[cut:]
        test_texts = [texts[i] for i in test_rows]
        test_labels = None if labels is None else labels[test_rows]
        texts = [texts[i] for i in order]
        labels = None if labels is None else labels[order]
    tokenizer = AutoTokenizer.from_pretrained(src.source, local_files_only=True)
    model = src.model
    hidden = src.hidden_size
    heads = nn.ModuleDict({str(k): _init_head(src, hidden) for k in exits})
    learned = LearnedExit(hidden) if config.recipe == "berxit" else None
    trainer = _Trainer(model, heads, tokenizer, src.max_length, config, rng, progress, learned)
    before = trainer.accuracy(test_texts, test_labels, shared=src) if test_labels is not None else {}
    trainer.run(texts, labels)
    after = trainer.accuracy(test_texts, test_labels) if test_labels is not None else {}
    save_checkpoint(out, src, heads, config, learned)
    return ClassifierTrainResult(exits, before, after, trainer.losses, len(test_texts))


def _init_head(src, hidden: int) -> ExitHead:
    """BERT's exits start from its own pooler and classifier (the stage-two heads then begin where the model's
    classifier is); the others from scratch."""
    head = ExitHead(hidden, src.num_labels)
    if src.family == "bert":
        head.dense.load_state_dict(src.model.bert.pooler.dense.state_dict())
        head.out.load_state_dict(src.model.classifier.state_dict())
    return head


class _Trainer:
    def __init__(self, model, heads, tokenizer, max_length, config, rng, progress, learned=None):
        self.model, self.heads, self.tokenizer, self.learned = model, heads, tokenizer, learned
        self.max_length, self.config, self.rng, self.progress = max_length, config, rng, progress
        self.losses: dict[str, list[float]] = {}

    def batches(self, texts, labels, shuffle: bool = True):
        order = list(range(len(texts)))
        if shuffle:
            self.rng.shuffle(order)
        for i in range(0, len(order), self.config.batch_size):
            rows = order[i:i + self.config.batch_size]
            enc = self.tokenizer([texts[r] for r in rows], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            yield enc, None if labels is None else torch.from_numpy(labels[rows])

    def forward(self, enc, frozen: bool = False):
        """The final logits and each exit's logits (the exits' hidden states kept in ``self.states`` for a learned
        exit); ``frozen``: the backbone runs without gradients."""
        with torch.set_grad_enabled(not frozen and torch.is_grad_enabled()):
            out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             output_hidden_states=True)
        self.states = {int(k): out.hidden_states[int(k)] for k in self.heads}
        return out.logits, {k: self.heads[str(k)](h) for k, h in self.states.items()}

    def stage(self, name: str, texts, labels, loss_fn, groups: list[dict], frozen: bool = False):
        """Epochs of ``loss_fn(final, exits, labels, step)`` over the texts, updating the parameter ``groups``
        (AdamW, each with its own rate); ``frozen``: the backbone is neither trained nor differentiated."""
        opt = torch.optim.AdamW(groups)
        steps = self.config.epochs * math.ceil(len(texts) / self.config.batch_size)
        step = 0
        for epoch in range(self.config.epochs):
            total, count = 0.0, 0
            self.model.train(not frozen)
            self.heads.train()
            for enc, y in self.batches(texts, labels):
                final, exits = self.forward(enc, frozen)
                loss = loss_fn(final, exits, y, step)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, count, step = total + loss.item(), count + 1, step + 1
                self.progress(f"{name}, epoch {epoch + 1}/{self.config.epochs}", step, steps, {"loss": loss.item()})
            self.losses.setdefault(name, []).append(total / max(count, 1))
        self.model.eval()
        self.heads.eval()

    def run(self, texts, labels) -> None:
        recipe, ce = self.config.recipe, nn.functional.cross_entropy
        backbone = {"params": list(self.model.parameters()), "lr": self.config.lr}
        extra = list(self.learned.parameters()) if self.learned is not None else []
        heads = {"params": list(self.heads.parameters()) + extra, "lr": self.config.head_lr}
        if recipe in ("deebert", "fastbert") and labels is not None:
            self.stage("fine-tuning the backbone and final classifier", texts, labels,
                       lambda final, exits, y, step: ce(final, y), [backbone])
        if recipe == "deebert":
            self.stage("training the exits (backbone frozen)", texts, labels,
                       lambda final, exits, y, step: sum(ce(e, y) for e in exits.values()), [heads], frozen=True)
        elif recipe == "fastbert":
            def distil(final, exits, y, step):
                teacher = torch.log_softmax(final.detach(), -1)
                return sum(nn.functional.kl_div(torch.log_softmax(e, -1), teacher, log_target=True,
                                                reduction="batchmean") for e in exits.values())

            self.stage("self-distilling the exits (backbone frozen)", texts, None, distil, [heads], frozen=True)
        elif recipe == "pabee":
            layers = self.model.config.num_hidden_layers if hasattr(self.model.config, "num_hidden_layers") \
                else self.model.config.n_layers

            def weighted(final, exits, y, step):
                total = sum(k * ce(e, y) for k, e in exits.items()) + layers * ce(final, y)
                return total / (sum(exits) + layers)

            self.stage("training every exit with the backbone (weights grow with depth)", texts, labels, weighted,
                       [backbone, heads])
        elif recipe == "berxit":
            def alternating(final, exits, y, step):
                if step % 2 == 0:
                    return ce(final, y)
                right = {k: (e.argmax(-1) == y).float() for k, e in exits.items()}  # the module's targets
                learned = sum(nn.functional.mse_loss(self.learned(self.states[k].detach()), right[k]) for k in exits)
                return sum(ce(e, y) for e in exits.values()) + learned

            self.stage("alternating the final and the exits' losses", texts, labels, alternating, [backbone, heads])

    @torch.no_grad()
    def accuracy(self, texts, labels, shared=None) -> dict[int, float]:
        """Held-out accuracy at each exit and the final classifier; with ``shared`` (the source encoder), the
        model's own classifier at every exit, as an untrained artifact would exit."""
        from eec.compiler.encoders import SharedHead

        self.model.eval()
        shared_head = SharedHead(shared) if shared is not None else None
        right: dict[int, int] = {}
        layers = None
        for enc, y in self.batches(texts, labels, shuffle=False):
            out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
            layers = len(out.hidden_states) - 1
            preds = {layers: out.logits}
            for k in map(int, self.heads):
                h = out.hidden_states[k]
                preds[k] = shared_head(h) if shared_head is not None else self.heads[str(k)](h)
            for k, logits in preds.items():
                right[k] = right.get(k, 0) + int((logits.argmax(-1) == y).sum())
        return {k: right[k] / len(texts) for k in sorted(right)}


def save_checkpoint(out: Path, src, heads: nn.ModuleDict, config: ClassifierTrainConfig,
                    learned: LearnedExit | None = None) -> None:
    """The fine-tuned model, its tokenizer and the exit heads: a plain dict of tensors, numbers and text."""
    body = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "base": {"config": src.model.config.to_dict(),
                 "state_dict": {k: v.detach().clone() for k, v in src.model.state_dict().items()}},
        "tokenizer": {"json": src.tokenizer_json},
        "exits": [{"layer": int(k), "kind": HEAD_KIND,
                   "state_dict": {n: p.detach().clone() for n, p in head.state_dict().items()}}
                  for k, head in sorted(heads.items(), key=lambda kv: int(kv[0]))],
        "learned_exit": None if learned is None else {
            "kind": LEARNED_EXIT_KIND, "state_dict": {n: p.detach().clone() for n, p in learned.state_dict().items()}},
        "metadata": {"recipe": config.recipe, "epochs": config.epochs, "seed": config.seed},
    }
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(body, tmp)
    tmp.replace(out)


def heldout_table(result: ClassifierTrainResult) -> list[tuple[int, float | None, float | None]]:
    layers = sorted(set(result.accuracy_before) | set(result.accuracy_after))
    return [(k, result.accuracy_before.get(k), result.accuracy_after.get(k)) for k in layers]

