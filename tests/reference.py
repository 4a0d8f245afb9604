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


def hf_forward(hf, sequence: list[int]):
    with torch.no_grad():
        return hf(torch.tensor([sequence]), output_hidden_states=True, use_cache=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def exit_tokens(hf, hidden_states, layer: int, norm_weight=None, proj_weight=None) -> list[int]:
    """argmax of an exit head at ``layer`` for every position, from transformers' hidden states.

    Without weights it is the model's own final norm and LM head (a shared exit).
    """
    n = hf.config.num_hidden_layers
    h = hidden_states[layer][0]
    if layer == n:  # transformers' last hidden state is already normed
        logits = hf.lm_head(h)
    else:
        norm_w = hf.model.norm.weight if norm_weight is None else norm_weight
        proj_w = hf.lm_head.weight if proj_weight is None else proj_weight
        logits = rms_norm(h, norm_w, hf.config.rms_norm_eps) @ proj_w.T
    return logits.argmax(-1).tolist()


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
