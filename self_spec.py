"""LayerSkip self-speculative decoding: draft, verify and accept as one fixed-shape step.

A step drafts k tokens with layers [0, E) and the shared head, runs the one missing early pass,
then verifies all k + 1 positions with layers [E, L) in one batched pass that starts from the
exit cache, so no KV entry or early hidden state is computed twice. Acceptance is speculative
rejection sampling, which at temperature 0 (one-hot distributions) is exactly "longest prefix
where the draft equals the full model's argmax". Position, count and tokens stay on the device:
the step has no host sync and compiles to one graph; the loop reads back once per step.
"""
from typing import Callable, Optional

import torch
from torch import Tensor

from generate import logits_to_probs, prefill, sample_from_probs
from model import Transformer


def speculative_step(model: Transformer, token: Tensor, pos: Tensor, k: int, temperature: float,
                     top_k: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """token (1, 1) at position pos (1,). Returns (out, n, next_token, next_pos): out[:n + 1] are
    the n accepted drafts and one token from the full model; next_token = out[n]."""
    drafts, draft_probs = [], []
    x = token
    for i in range(k):  # unrolled when compiled: k is a constant
        probs = logits_to_probs(model.head(model.early(x, pos + i))[:, -1], temperature, top_k)
        x = sample_from_probs(probs).view(1, 1)
        drafts.append(x.view(1))
        draft_probs.append(probs)
    model.early(x, pos + k)  # the last draft's early pass: its KV and exit-layer state, no head

    positions = pos + torch.arange(k + 1, device=pos.device)
    exit_states = model.exit_cache.index_select(1, positions)
    target_probs = logits_to_probs(model.head(model.late(exit_states, positions))[0], temperature, top_k)

    # Accept draft i with probability min(1, p_i(d_i) / q_i(d_i)); n = accepted before the first miss.
    draft = torch.cat(drafts)
    q = torch.cat(draft_probs)
    p_draft = target_probs[:k].gather(1, draft[:, None])[:, 0]
    q_draft = q.gather(1, draft[:, None])[:, 0]
    accept = torch.rand(k, device=pos.device) * q_draft < p_draft
    n = torch.cumprod(accept.int(), 0).sum()

    # The token after the accepted drafts: from max(p - q, 0) after a rejection, from p after k
    # acceptances (q padded with zeros); falls back to p if rounding left no residual mass.
    q = torch.cat([q, torch.zeros_like(q[:1])])
    residual = (target_probs - q).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target_probs)
    next_token = sample_from_probs(residual.index_select(0, n.view(1)))[0]
    out = torch.cat([draft, next_token.view(1)])
    out = torch.where(torch.arange(k + 1, device=pos.device) == n, next_token, out)
    return out, n, next_token.view(1, 1), pos + n + 1


def speculative_generate(model: Transformer, prompt: Tensor, max_new_tokens: int, k: int, *,
                         temperature: float, top_k: Optional[int], eos_id: int,
                         prefill_fn: Callable = prefill, step_fn: Callable = speculative_step,
                         on_tokens: Optional[Callable[[list[int], list[bool]], None]] = None
                         ) -> tuple[list[int], dict]:
    """Prefill with the full model, then steps until EOS (kept) or max_new_tokens.

    The model's caches must be set up with the exit layer and k + 1 positions of slack.
    Returns the tokens and {"acceptance_rate", "tokens_per_step"}.
    """
    input_pos = torch.arange(prompt.numel(), device=prompt.device)
    token = prefill_fn(model, prompt.view(1, -1), input_pos, temperature, top_k)
    tokens = [token.item()]
    if on_tokens:
        on_tokens(tokens, [False])
    pos = input_pos[-1:] + 1
    accepted = steps = 0
    while tokens[-1] != eos_id and len(tokens) < max_new_tokens:
        out, n, token, pos = step_fn(model, token, pos, k, temperature, top_k)
        # A CUDA graph overwrites its outputs on the next replay: keep our own copies.
        token, pos = token.clone(), pos.clone()
        n, *out = torch.cat([n.view(1), out]).tolist()  # the step's one read back to the host
        accepted, steps = accepted + n, steps + 1
        new = out[: n + 1]
        if eos_id in new:
            new = new[: new.index(eos_id) + 1]
        new = new[: max_new_tokens - len(tokens)]
        tokens += new
        if on_tokens:
            on_tokens(new, ([True] * n + [False])[: len(new)])
    stats = {"acceptance_rate": accepted / (steps * k) if steps else None,
             "tokens_per_step": (len(tokens) - 1) / steps if steps else None}
    return tokens, stats
