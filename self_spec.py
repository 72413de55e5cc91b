"""LayerSkip self-speculative decoding: draft, verify and accept as one fixed-shape step.

A step drafts k tokens with layers [0, E) and the shared head, runs the one missing early pass,
then verifies all k + 1 positions with layers [E, L) in one batched pass that starts from the
exit cache, so no KV entry or early hidden state is computed twice. Acceptance is speculative
rejection sampling, which at temperature 0 (one-hot distributions) is exactly "longest prefix
where the draft equals the full model's argmax". Position, count and tokens stay on the device:
the step has no host sync and compiles to one graph; the loop reads back once per step.
"""
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from common import generate_batch, logits_to_probs, prefill, sample_from_probs
from model import Transformer


def speculative_step(model: Transformer, token: Tensor, pos: Tensor, k: int, temperature: float,
                     top_k: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """token (B, 1) at positions pos (B,), one row per cache row. Returns (out (B, k + 1), n (B,),
    next_token (B, 1), next_pos (B,)): out[b, :n[b] + 1] are row b's n[b] accepted drafts and one
    token from the full model; next_token[b] = out[b, n[b]]."""
    batch = token.shape[0]
    rows = torch.arange(batch, device=pos.device)
    drafts, draft_probs = [], []
    x = token
    for i in range(k):  # unrolled when compiled: k is a constant
        probs = logits_to_probs(model.head(model.early(x, (pos + i)[:, None]))[:, -1], temperature, top_k)
        x = sample_from_probs(probs)[:, None]
        drafts.append(x)
        draft_probs.append(probs)
    model.early(x, (pos + k)[:, None])  # the last draft's early pass: its KV and exit-layer state, no head

    positions = pos[:, None] + torch.arange(k + 1, device=pos.device)  # (B, k + 1)
    exit_states = model.exit_cache[rows[:, None], positions]
    target_probs = logits_to_probs(model.head(model.late(exit_states, positions)), temperature, top_k)

    # Accept draft i with probability min(1, p_i(d_i) / q_i(d_i)); n = accepted before the first miss.
    draft = torch.cat(drafts, 1)  # (B, k)
    q = torch.stack(draft_probs, 1)  # (B, k, V)
    p_draft = target_probs[:, :k].gather(2, draft[..., None])[..., 0]
    q_draft = q.gather(2, draft[..., None])[..., 0]
    accept = torch.rand(batch, k, device=pos.device) * q_draft < p_draft
    n = torch.cumprod(accept.int(), 1).sum(1)

    # The token after the accepted drafts: from max(p - q, 0) after a rejection, from p after k
    # acceptances (q padded with zeros); falls back to p if rounding left no residual mass.
    q = torch.cat([q, torch.zeros_like(q[:, :1])], 1)
    residual = (target_probs - q).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target_probs)
    next_token = sample_from_probs(residual[rows, n])[:, None]  # (B, 1)
    out = torch.cat([draft, next_token], 1)
    out = torch.where(torch.arange(k + 1, device=pos.device) == n[:, None], next_token, out)
    return out, n, next_token, pos + n + 1


def speculative_generate(model: Transformer, prompt: Tensor, max_new_tokens: int, k: int, *,
                         temperature: float, top_k: Optional[int], eos_id: int,
                         prefill_fn: Callable = prefill, step_fn: Callable = speculative_step,
                         on_tokens: Optional[Callable[[int, list[int], list[bool]], None]] = None
                         ) -> tuple[list[int], dict]:
    """One prompt: prefill with the full model, then steps until EOS (kept) or max_new_tokens.

    The model's caches must be set up with the exit layer and k + 1 positions of slack.
    Returns the tokens and {"acceptance_rate", "tokens_per_step"}.
    """
    result = generate_batch(
        model, [prompt.tolist()], max_new_tokens, eos_id=eos_id, on_tokens=on_tokens,
        prefill_fn=partial(prefill_fn, temperature=temperature, top_k=top_k),
        steps={k: partial(step_fn, k=k, temperature=temperature, top_k=top_k)})[0]
    return result["generated_tokens"], {key: result[key] for key in ("acceptance_rate", "tokens_per_step")}
