"""The model writes its own training data: greedy continuations of starting prompts.

For every generated token we keep the hidden state at each candidate exit
layer (the input the head will see) and the final model's distribution at
that position as its top-k log-probabilities (the rest of the mass is one
bucket), which bounds memory at k + 1 numbers per token instead of the
vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from eec.calib.calibrate import packaged_prompts
from eec.errors import InputError

Progress = Callable[[str, int, int], None]


@dataclass
class TrainingData:
    hidden: dict[int, torch.Tensor]  # layer -> [tokens, hidden]
    top_index: torch.Tensor  # [tokens, k] the final distribution's top-k token ids
    top_logp: torch.Tensor  # [tokens, k] their log-probabilities
    sequence: torch.Tensor  # [tokens] which prompt each token came from
    # The generated batches themselves, for training the backbone (joint mode):
    # (token ids [B, T], attention mask [B, T], position ids [B, T], target rows [B, T] bool), in row order.
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.top_index.shape[0]

    @property
    def target(self) -> torch.Tensor:
        """The final model's greedy token at each position."""
        return self.top_index[:, 0]

    def subset(self, rows: torch.Tensor) -> "TrainingData":
        return TrainingData({k: v[rows] for k, v in self.hidden.items()}, self.top_index[rows], self.top_logp[rows],
                            self.sequence[rows])


def default_prompts() -> list[str]:
    return packaged_prompts("eec.train")


def encode_prompts(prompts: Sequence, tokenizer) -> list[list[int]]:
    """Token ids; text prompts go through the chat template when the model has one."""
    out = []
    for p in prompts:
        if not isinstance(p, str):
            out.append([int(t) for t in p])
        elif tokenizer is None:
            try:
                out.append([int(t) for t in p.split(",")])
            except ValueError:
                raise InputError("this model has no tokenizer; prompts must be comma-separated token ids") from None
        elif getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        else:
            out.append(tokenizer(p)["input_ids"])
    return out


@torch.no_grad()
def generate_training_data(
    model,
    prompts: list[list[int]],
    exits: list[int],
    max_new_tokens: int,
    eos_ids: list[int],
    top_k: int = 32,
    batch_size: int = 16,
    progress: Progress = lambda *_: None,
) -> TrainingData:
    pad = eos_ids[0] if eos_ids else 0
    hidden = {e: [] for e in exits}
    top_index, top_logp, sequence, batches = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        progress("generating training data", start, len(prompts))
        batch = prompts[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=eos_ids or None)
        new = out[:, width:]
        # Rows to keep: positions that predicted a generated token, up to and including the first end-of-sequence.
        keep = torch.ones_like(new, dtype=torch.bool)
        for i, row in enumerate(new.tolist()):
            ends = [j for j, t in enumerate(row) if t in eos_ids]
            if ends:
                keep[i, ends[0] + 1 :] = False
        full_mask = torch.cat([mask, keep.long()], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        fwd = model(out, attention_mask=full_mask, position_ids=positions, output_hidden_states=True)
        # The hidden state at position t predicts the token at t + 1.
        rows = torch.zeros_like(full_mask, dtype=torch.bool)
        rows[:, width - 1 : -1] = keep
        logp = torch.log_softmax(fwd.logits[rows].float(), dim=-1)
        values, indices = logp.topk(top_k, dim=-1)
        top_index.append(indices)
        top_logp.append(values)
        for e in exits:
            hidden[e].append(fwd.hidden_states[e][rows].float())
        sequence.append(torch.arange(start, start + len(batch)).repeat_interleave(keep.sum(1)))
        batches.append((out, full_mask, positions, rows))
    progress("generated training data", len(prompts), len(prompts))
    return TrainingData({e: torch.cat(v) for e, v in hidden.items()}, torch.cat(top_index), torch.cat(top_logp),
                        torch.cat(sequence), batches)
