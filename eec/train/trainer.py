"""``eec train``: Valade's self-supervised exit heads on a frozen backbone."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from eec.compiler.checkpoint import Checkpoint, save_checkpoint
from eec.compiler.frontends import load_source
from eec.compiler.segments import check_exits
from eec.errors import InputError
from eec.train.data import TrainingData, default_prompts, encode_prompts, generate_training_data
from eec.train.heads import INITS, new_head, valade_loss

# (what, done, total, figures to show)
Progress = Callable[[str, int, int, dict], None]


@dataclass
class TrainConfig:
    exits: list[int]
    lam: float = 0.1  # entropy weight λ of the loss
    epochs: int = 4
    lr: float = 1e-3  # exit heads
    backbone_lr: float = 2e-5  # joint mode: the backbone and its final head
    floor: float = 0.95  # joint mode: undo the epoch that takes final-layer agreement with the original below this
    layer_drop: float = 0.0  # joint mode: the deepest layer's skip probability per batch (LayerSkip)
    max_new_tokens: int = 64  # per prompt, when generating training data
    max_tokens: int | None = None  # cap on training tokens
    init: str = "copy"
    mode: str = "heads"  # "heads": frozen backbone; "joint": fine-tune the backbone too
    seed: int = 0
    batch_size: int = 256
    top_k: int = 32
    validation: float = 0.1  # share of prompts held out to report agreement on
    prompts: list = field(default_factory=list)  # empty: eec's default set


MODES = ("heads", "joint")


@dataclass
class HeadReport:
    layer: int
    loss: float
    agreement_before: float  # validation agreement with the original model's final token
    agreement: float


@dataclass
class TrainResult:
    heads: list[HeadReport]
    final_agreement: float | None = None  # joint mode: fine-tuned final layer vs the original, held out
    epochs_run: int | None = None  # joint mode: epochs kept (the floor may stop training early)
    undone_final_agreement: float | None = None  # joint mode: where the epoch the floor undid had taken it


def fit_head(head, data: TrainingData, layer: int, config: TrainConfig, generator: torch.Generator,
             on_step: Callable[[float], None] = lambda _: None) -> float:
    """Train one head on ``data`` with Valade's loss; return the last batch's loss."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=0.0)
    loss_value = float("nan")
    for _ in range(config.epochs):
        for rows in torch.randperm(len(data), generator=generator).split(config.batch_size):
            loss = valade_loss(head(data.hidden[layer][rows]), data.top_index[rows], data.top_logp[rows], config.lam)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            on_step(loss_value)
    return loss_value


def agreement(head, data: TrainingData, layer: int) -> float:
    """Share of tokens where the head's top token is the final model's."""
    if len(data) == 0:
        return float("nan")
    with torch.no_grad():
        hits = sum(int((head(h).argmax(-1) == t).sum()) for h, t in zip(data.hidden[layer].split(1024), data.target.split(1024)))
    return hits / len(data)


def _check(config: TrainConfig, num_layers: int) -> None:
    check_exits(config.exits, num_layers)
    if not config.exits:
        raise InputError("give at least one exit layer (--exits)")
    if not 0.0 <= config.lam <= 1.0:
        raise InputError(f"--lambda must be in [0, 1], got {config.lam}")
    if config.mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if config.init not in INITS:
        raise InputError(f"--init must be one of {', '.join(INITS)}, got {config.init!r}")
    if not 0.0 <= config.floor <= 1.0:
        raise InputError(f"--floor must be in [0, 1], got {config.floor}")
    if not 0.0 <= config.layer_drop < 1.0:
        raise InputError(f"--layer-drop must be in [0, 1), got {config.layer_drop}")
    if config.epochs < 1 or config.lr <= 0 or config.max_new_tokens < 2:
        raise InputError("--epochs must be at least 1, --lr positive and --max-new-tokens at least 2")


def train(base: str | os.PathLike, out: str | os.PathLike, config: TrainConfig,
          progress: Progress = lambda *_: None) -> TrainResult:
    """Generate data with the base model, train one head per exit (and in joint
    mode the backbone too), write ``model.pt``."""
    out = Path(out)
    _check_writable(out)  # before minutes of training, not after
    torch.manual_seed(config.seed)
    src = load_source(base)
    model = src.model
    for p in model.parameters():
        p.requires_grad_(False)
    _check(config, model.config.num_hidden_layers)
    tokenizer = _hf_tokenizer(src)
    prompts = encode_prompts(config.prompts or default_prompts(), tokenizer)
    data = generate_training_data(model, prompts, config.exits, config.max_new_tokens, src.eos_token_ids, config.top_k,
                                  progress=lambda what, done, total: progress(what, done, total, {}))
    if len(data) == 0:
        raise InputError("the base model generated no tokens from these prompts")
    g = torch.Generator().manual_seed(config.seed)
    n_val = int(round(len(prompts) * config.validation)) if len(prompts) > 1 else 0
    val_seqs = torch.randperm(len(prompts), generator=g)[:n_val]
    is_val = torch.isin(data.sequence, val_seqs)
    train_data, val_data = data.subset(~is_val), data.subset(is_val)
    if config.mode == "joint":
        result, ckpt = _train_joint(src, data, is_val, config, g, progress)
        if result.epochs_run == 0:
            # The floor undid the first epoch: the backbone stays as it was, so the
            # heads are worth training on it as in frozen mode rather than left untrained.
            progress("floor reached before any joint epoch: training heads on the frozen backbone", 0, 1, {})
            undone = result.undone_final_agreement
            result, ckpt = _train_heads(src, train_data, val_data, config, g, progress)
            result.final_agreement, result.epochs_run, result.undone_final_agreement = 1.0, 0, undone
            ckpt.metadata["trained_by"] += "; joint mode stopped by --floor before its first epoch"
    else:
        if config.max_tokens:
            train_data = train_data.subset(torch.arange(min(config.max_tokens, len(train_data))))
        result, ckpt = _train_heads(src, train_data, val_data, config, g, progress)
    ckpt.metadata.update({
        "config": {k: v for k, v in asdict(config).items() if k != "prompts"},
        "validation_tokens": int(is_val.sum()),
        "reports": [asdict(r) for r in result.heads],
        "final_agreement": result.final_agreement,
        "epochs_run": result.epochs_run,
        "undone_final_agreement": result.undone_final_agreement,
    })
    tmp = _staging(out)
    try:
        save_checkpoint(ckpt, tmp)
        os.replace(tmp, out)
    except OSError as e:  # the disk filled or the folder changed during training
        raise InputError(f"cannot write {out}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return result


def _staging(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def _check_writable(out: Path) -> None:
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise InputError(f"{out} is a folder; name the checkpoint file to write, e.g. {out / 'model.pt'}")
    tmp = _staging(out)
    try:
        tmp.touch()
        tmp.unlink()
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror}") from None


def _train_heads(src, train_data, val_data, config, g, progress) -> tuple[TrainResult, Checkpoint]:
    reports, heads = [], []
    steps = len(config.exits) * config.epochs * -(-len(train_data) // config.batch_size)
    done = 0
    for layer in config.exits:
        head = new_head(src.model, config.init, g)
        before = agreement(head, val_data, layer)

        def on_step(loss: float) -> None:
            nonlocal done
            done += 1
            progress(f"training head at layer {layer}", done, steps, {"loss": loss})

        loss = fit_head(head, train_data, layer, config, g, on_step)
        after = agreement(head, val_data, layer)
        progress(f"head at layer {layer} done", done, steps, {"agreement": after})
        reports.append(HeadReport(layer, loss, before, after))
        heads.append(head.to_weights(layer))
    base = {"path": str(Path(src.source).absolute())}
    meta = {"trained_by": "eec train --mode heads (frozen backbone)", "training_tokens": len(train_data)}
    return TrainResult(reports), Checkpoint(base, heads, None, meta)


def _train_joint(src, data, is_val, config, g, progress) -> tuple[TrainResult, Checkpoint]:
    from eec.train.joint import train_joint

    heads = {layer: new_head(src.model, config.init, g) for layer in config.exits}
    steps = config.epochs * len(data.batches)
    done = 0

    def on_step(loss: float) -> None:
        nonlocal done
        done += 1
        progress("fine-tuning backbone and heads", done, steps, {"loss": loss})

    student, report = train_joint(src.model, heads, data, is_val, lam=config.lam, epochs=config.epochs, lr=config.lr,
                                  backbone_lr=config.backbone_lr, generator=g, floor=config.floor,
                                  layer_drop=config.layer_drop, on_step=on_step)
    progress("joint training done", done, steps, {"agreement": report.final_agreement})
    reports = [HeadReport(layer, report.final_loss, report.exit_agreement_before[layer], report.exit_agreement[layer])
               for layer in config.exits]
    cfg = student.config.to_dict()
    cfg.pop("quantization_config", None)  # the weights are plain fp32 now, whatever they were loaded from
    tok = src.tokenizer
    ckpt = Checkpoint(
        base={"config": cfg, "state_dict": {k: v.detach().clone() for k, v in student.state_dict().items()}},
        exits=[heads[layer].to_weights(layer) for layer in config.exits],
        tokenizer=None if tok is None else {"json": tok.json, "chat_template": tok.chat_template,
                                            "bos_token": tok.bos_token, "eos_token": tok.eos_token},
        metadata={"trained_by": "eec train --mode joint (fine-tuned backbone)", "eos_token_ids": src.eos_token_ids,
                  "training_tokens": int((~is_val).sum())},
    )
    return TrainResult(reports, report.final_agreement, report.epochs_run, report.undone_final_agreement), ckpt


def _hf_tokenizer(src):
    """The base model's tokenizer as a transformers tokenizer (chat template included), or None."""
    if src.tokenizer is None:
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(src.tokenizer.json),
                                  bos_token=src.tokenizer.bos_token, eos_token=src.tokenizer.eos_token)
    tok.chat_template = src.tokenizer.chat_template
    return tok
