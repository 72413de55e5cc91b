"""LayerSkip self-speculative decoding: draft, verify and accept as one fixed-shape step.

A step drafts k tokens with layers [0, E) and the shared head, runs the one missing early pass,
then verifies all k + 1 positions with layers [E, L) in one batched pass that starts from the
exit cache, so no KV entry or early hidden state is computed twice. Acceptance is speculative
rejection sampling, which at temperature 0 (one-hot distributions) is exactly "longest prefix
where the draft equals the full model's argmax". Position, count and tokens stay on the device:
the step has no host sync and compiles to one graph; the loop reads back once per step.

With k = "auto" the loop picks k before each step from a small set, each its own fixed-shape
graph compiled once: the k with the most expected tokens per second under the acceptance rate
seen lately and what a step at each k has been measured to cost on this device - or a plain
autoregressive step when no k is expected to beat it, with a drafting step now and then to see
whether the text has become easier. Each step is exact whatever its k, so the output is too.

With a draft vocabulary (`--draft_vocab N`) drafts come from a head of only the N most frequent
tokens' rows (by the tokenizer's own order, or counted on a corpus with `--draft_vocab_from`):
a draft reads a fraction of the head, and verification, with the full head, keeps the output exact.
"""
import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from common import (ACCEPT, DRAFT, atomic_write, decode_one_token, generate_batch, greedy_tokens, is_greedy,
                    logits_to_probs, prefill, row_uniform, sample_from_probs)
from model import ModelArgs, Transformer
from tokenizer import load_tokenizer

AUTO_K = (0, 1, 2, 4, 6, 8)  # what "auto" chooses from; 0 is an autoregressive step


def speculative_step(model: Transformer, token: Tensor, pos: Tensor, k: int, temperature: Union[float, Tensor],
                     top_k: Union[int, None, Tensor], top_p: Optional[Tensor] = None,
                     seed: Optional[Tensor] = None, limit: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """token (B, 1) at positions pos (B,), one row per cache row. Returns (out (B, k + 1), n (B,),
    next_token (B, 1), next_pos (B,)): out[b, :n[b] + 1] are row b's n[b] accepted drafts and one
    token from the full model; next_token[b] = out[b, n[b]]. Sampling settings as logits_to_probs
    takes them; with seed (B,) every draw comes from the row's own stream (common.row_uniform).
    limit (B,), given, caps each row's drafts: row b takes at most limit[b] <= k of them, as a
    step with k = limit[b] would (PerRowK)."""
    batch = token.shape[0]
    rows = torch.arange(batch, device=pos.device)
    kept = model.draft_ids  # drafts over these tokens only (Transformer.set_draft_vocab), or None: all
    greedy = is_greedy(temperature)  # then no distributions over the vocabulary at all: argmaxes
    drafts, choices, draft_probs = [], [], []
    x = token
    for i in range(k):  # unrolled when compiled: k is a constant
        logits = model.draft_head(model.early(x, (pos + i)[:, None]))[:, -1]
        if greedy:
            choice = greedy_tokens(logits)  # an index into the draft head's tokens
        else:
            probs = logits_to_probs(logits, temperature, top_k, top_p)
            choice = sample_from_probs(probs, seed, pos + i + 1, DRAFT)
            draft_probs.append(probs)
            choices.append(choice[:, None])
        x = (choice if kept is None else kept[choice])[:, None]
        drafts.append(x)
    model.early(x, (pos + k)[:, None])  # the last draft's early pass: its KV and exit-layer state, no head

    positions = pos[:, None] + torch.arange(k + 1, device=pos.device)  # (B, k + 1)
    exit_states = model.exit_cache[rows[:, None], positions]
    target_logits = model.head(model.late(exit_states, positions))
    draft = torch.cat(drafts, 1)  # (B, k)
    if greedy:  # what the rule below gives on one-hot distributions: accept while draft = argmax
        target = greedy_tokens(target_logits)  # (B, k + 1)
        n = accepted_count(draft == target[:, :k], limit)
        next_token = target[rows, n][:, None]
    else:
        n, next_token = accept_sampled(logits_to_probs(target_logits, temperature, top_k, top_p), draft,
                                       torch.cat(choices, 1), torch.stack(draft_probs, 1), kept, positions, seed, limit)
    out = torch.cat([draft, next_token], 1)
    out = torch.where(torch.arange(k + 1, device=pos.device) == n[:, None], next_token, out)
    return out, n, next_token, pos + n + 1


def accepted_count(accept: Tensor, limit: Optional[Tensor]) -> Tensor:
    """Per row of accept (B, k): the drafts accepted before the first refused one, at most limit[b]."""
    n = torch.cumprod(accept.int(), 1).sum(1)
    return n if limit is None else torch.minimum(n, limit)


def accept_sampled(target_probs: Tensor, draft: Tensor, choices: Tensor, q: Tensor, kept: Optional[Tensor],
                   positions: Tensor, seed: Optional[Tensor], limit: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Rejection sampling of drafts (B, k) - choices (B, k) their indices among the draft head's
    tokens, q (B, k, N) the draft distributions - against target_probs (B, k + 1, V): returns the
    accepted counts n (B,) and the token after them (B, 1)."""
    batch, k = draft.shape
    rows = torch.arange(batch, device=draft.device)
    pos = positions[:, 0]
    # Accept draft i with probability min(1, p_i(d_i) / q_i(d_i)); n = accepted before the first miss.
    # q is the draft distribution: over the draft head's tokens, zero outside them.
    p_draft = target_probs[:, :k].gather(2, draft[..., None])[..., 0]
    q_draft = q.gather(2, choices[..., None])[..., 0]
    if seed is None:
        uniform = torch.rand(batch, k, device=draft.device)
    else:
        uniform = row_uniform(seed, positions[:, 1:], ACCEPT)
    n = accepted_count(uniform * q_draft < p_draft, limit)

    # The token after the accepted drafts: from max(p - q, 0) after a rejection, from p after k
    # acceptances (q padded with zeros); falls back to p if rounding left no residual mass. Only
    # position n of each row is needed: q of the kept tokens is subtracted there.
    p_next = target_probs[rows, n]  # (B, V)
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, n]  # (B, N)
    if limit is not None:  # a row that took all its limit[b] drafts: the next token from p
        q_next = torch.where((n < limit)[:, None], q_next, 0.0)
    if kept is None:
        residual = (p_next - q_next).clamp_min(0)
    else:
        residual = p_next.scatter_add(1, kept.expand(batch, -1), -q_next).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return n, sample_from_probs(residual, seed, pos + n + 1)[:, None]


def parse_speculate_k(text: str) -> Union[int, str]:
    """--speculate_k's value: a positive integer, or "auto"."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text!r}")
    return int(text)


def add_draft_vocab_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft_vocab", type=int, metavar="N",
                        help="self-speculation: draft over the N most frequent tokens only (a smaller head; exact output)")
    parser.add_argument("--draft_vocab_from", type=Path, metavar="FILE",
                        help="with --draft_vocab: rank tokens by their count in this text or JSONL file "
                             '("prompt"/"text" fields) instead of the tokenizer\'s order; counted once, kept beside the checkpoint')


def draft_vocab_checks(args: argparse.Namespace, needs_draft_layers: bool = True) -> list[tuple[bool, str]]:
    """(wrong, message) for --draft_vocab / --draft_vocab_from on their own, and, where
    --draft_layers has no default (needs_draft_layers), --draft_vocab without it."""
    return [
        (needs_draft_layers and args.draft_vocab is not None and args.draft_layers is None, "--draft_vocab needs --draft_layers"),
        (args.draft_vocab_from is not None and args.draft_vocab is None, "--draft_vocab_from needs --draft_vocab"),
        (args.draft_vocab is not None and args.draft_vocab < 1, f"--draft_vocab must be at least 1, got {args.draft_vocab}"),
        (args.draft_vocab_from is not None and not args.draft_vocab_from.is_file(),
         f"--draft_vocab_from: file not found: {args.draft_vocab_from}"),
    ]


def corpus_texts(path: Path) -> list[str]:
    """A text file whole, or JSONL's "prompt" and "text" fields."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("{"):
        return [text]
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e.msg})") from None
            texts += [entry[key] for key in ("prompt", "text") if isinstance(entry, dict) and isinstance(entry.get(key), str)]
    if not texts:
        raise ValueError(f'{path}: no "prompt" or "text" strings')
    return texts


def corpus_token_counts(tokenizer, corpus: Path, save_dir: Path) -> Counter:
    """How often each token occurs in the corpus. Counted once per corpus content: the counts are
    saved in save_dir (beside the checkpoint) as draft_vocab_counts.<hash>.json and read from there."""
    try:
        data = corpus.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {corpus}: {e}") from None
    saved = save_dir / f"draft_vocab_counts.{hashlib.sha256(data).hexdigest()[:16]}.json"
    if saved.is_file():
        return Counter({int(i): n for i, n in json.loads(saved.read_text())["counts"].items()})
    try:
        texts = corpus_texts(corpus)
    except UnicodeDecodeError as e:
        raise ValueError(f"{corpus} is not UTF-8 text: {e}") from None
    counts = Counter()
    for text in texts:
        counts.update(tokenizer.encode(text, bos=False))
    record = {"corpus": str(corpus), "tokens": sum(counts.values()), "counts": {str(i): n for i, n in counts.most_common()}}
    try:
        atomic_write(saved, lambda tmp: tmp.write_text(json.dumps(record) + "\n"))
    except OSError as e:  # a read-only checkpoint folder: counted again next time
        print(f"warning: cannot save the token counts beside the checkpoint: {e}", file=sys.stderr)
    return counts


def draft_vocab_ids(tokenizer, n: int, vocab_size: int, counts: Optional[Counter] = None) -> Tensor:
    """The n token ids a draft head keeps, sorted: the tokenizer's frequency order (special tokens
    the model emits, such as EOS, first, so always kept), or the most counted tokens after those
    (ties, and tokens never counted, in the tokenizer's order). Ids the model has past the
    tokenizer's come last."""
    if not 1 <= n <= vocab_size:
        raise ValueError(f"--draft_vocab must be between 1 and the vocabulary's {vocab_size} tokens, got {n}")
    order = tokenizer.frequency_order()
    if counts is not None:
        rank = {token: i for i, token in enumerate(order)}
        order = sorted(order, key=lambda t: (t not in tokenizer.emitted_ids, -counts.get(t, 0), rank[t]))
    order = [t for t in order if t < vocab_size] + list(range(tokenizer.vocab_size, vocab_size))
    return torch.tensor(sorted(order[:n]))


def draft_vocab_for(args: argparse.Namespace, checkpoint_path: Path) -> Optional[Tensor]:
    """The draft head's token ids that --draft_vocab / --draft_vocab_from ask for, for the checkpoint
    (None: no flag, the full head). Before the model is loaded: an int4 head's rows are taken before
    it is packed. Raises ValueError / FileNotFoundError with a one-line message."""
    if args.draft_vocab is None:
        return None
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
    tokenizer = load_tokenizer(checkpoint_path.parent)
    vocab_size = ModelArgs.load(checkpoint_path.parent / "model_config.json").vocab_size
    counts = None
    if args.draft_vocab_from is not None:
        counts = corpus_token_counts(tokenizer, args.draft_vocab_from, checkpoint_path.parent)
    return draft_vocab_ids(tokenizer, args.draft_vocab, vocab_size, counts)


def speculative_steps(ks: tuple[int, ...], temperature: Union[float, Tensor], top_k: Union[int, None, Tensor],
                      step_fn: Callable = speculative_step, decode_fn: Callable = decode_one_token,
                      **row_settings: Tensor) -> dict[int, Callable]:
    """{k: step(model, token, pos)} with the sampling settings bound; k = 0 is an autoregressive step.
    row_settings: top_p and seed, where the settings are per-row tensors; and the drafting steps'
    limit (PerRowK)."""
    sampling = {name: value for name, value in row_settings.items() if name != "limit"}
    return {k: partial(step_fn, k=k, temperature=temperature, top_k=top_k, **row_settings) if k
            else partial(decode_fn, temperature=temperature, top_k=top_k, **sampling) for k in ks}


def decoding_functions(temperature: Union[float, Tensor], top_k: Union[int, None, Tensor],
                       speculate_k: Union[int, str, None] = None, early_exit: bool = False, compile: bool = False,
                       device: str = "cpu", compile_prefill: bool = False,
                       **row_settings: Tensor) -> tuple[Callable, dict[int, Callable]]:
    """A run's prefill and steps ({k: step}; 0 is autoregressive): one autoregressive step without
    speculate_k, one drafting k tokens with it, AUTO_K's with "auto"; compiled if asked (the steps
    as whole graphs, on CUDA replayed as CUDA graphs), with their sampling settings bound: numbers
    for every row, or tensors (B,) that hold each cache row's (with row_settings top_p and seed;
    a server writes a row's values as a request takes it)."""
    prefill_fn, decode_fn, step_fn = prefill, decode_one_token, speculative_step
    if compile:
        on_cuda = device.startswith("cuda")
        # No coordinate-descent tuning on CUDA (gpt-fast sets it): with it inductor writes a one-row
        # product as a reduction of its own, summed in another order than cuBLAS's product over a
        # verify pass's k + 1 rows, and greedy self-speculation drifts from autoregression (on an
        # H200 the demo's int8 file did, on 1 prompt of 5). Without it a row's product is cuBLAS's
        # (the same bits alone and among 2 to 56 rows there, at the shapes measured) or the int8
        # kernel's (the same by construction).
        # Eager rounds each bfloat16 op's result to 16 bits; inductor, fusing ops, keeps float32
        # between them unless told to round. A verify pass starts its late layers from hidden states
        # rounded into the exit cache, where an autoregressive step's fused kernels would carry them
        # unrounded: greedy self-speculation would then drift from autoregression.
        torch._inductor.config.emulate_precision_casts = True
        # Inductor splits a reduction over threads where a kernel has one row (a norm in a one-row
        # step), so the sum's order, and its last bit, would depend on how many rows come with a
        # row: a verify pass's k + 1 rows and a batch's B would drift from a lone row. A kernel
        # gets a thread per 16384 elements of work, so a norm's row (up to 32767 columns) stays
        # on one; the heavy work is in the engine's own ops, which thread as they choose.
        torch._inductor.config.cpp.min_chunk_size = 16384
        mode = "reduce-overhead" if on_cuda else "default"
        decode_fn = torch.compile(decode_one_token, mode=mode, fullgraph=True)
        step_fn = torch.compile(speculative_step, mode=mode, fullgraph=True)
        if compile_prefill:
            prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True)
    sampling = dict(temperature=temperature, top_k=top_k, **row_settings)
    if speculate_k is not None:
        steps = speculative_steps(AUTO_K if speculate_k == "auto" else (speculate_k,), temperature, top_k, step_fn, decode_fn,
                                  **row_settings)
    else:
        steps = {0: partial(decode_fn, early_exit=early_exit, **sampling)}
    return partial(prefill_fn, early_exit=early_exit, **sampling), steps


def allow_graphs(n: int) -> None:
    """Lets dynamo compile one function into n graphs. The engine compiles each step as a graph of
    fixed shapes: speculative_step once per k, and every step once more for each batch size,
    cache length, exit layer and sampling setting a run uses. Past dynamo's default limit (8 graphs
    per function) fullgraph=True turns the next compilation into a hard failure, so a run that asks
    for more graphs (auto's five k at a second cache length, say) raises the limit to its count."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n)


_warmed_graphs = 0  # graphs warm_up has compiled in this process: at most this many per function


def warm_up(model: Transformer, prefill_fn: Callable, steps: dict[int, Callable], batch_size: int) -> float:
    """Compiles every step for this batch size and the caches as they are set up, before anything
    is timed: each runs once on placeholder tokens at position 0 (the prefill that follows
    overwrites what they wrote). Each call may add one graph per step (allow_graphs)."""
    global _warmed_graphs
    _warmed_graphs += len(steps)
    allow_graphs(_warmed_graphs)
    device = model.tok_embeddings.weight.device
    t0 = time.perf_counter()
    with torch.inference_mode():
        prefill_fn(model, torch.zeros(1, 2, dtype=torch.long, device=device), torch.tensor([2], device=device),
                   torch.tensor([0], device=device))
        for step in steps.values():
            token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            step(model, token, torch.zeros(batch_size, dtype=torch.long, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# --- choosing k ----------------------------------------------------------------------------------

def expected_tokens(k: int, survival: list[float]) -> float:
    """Tokens a step with k drafts yields: the token from the full model, plus draft j for every j
    whose drafts 1..j are all accepted, which happens with probability survival[j]."""
    return 1 + sum(survival[1 : k + 1])


def best_k(survival: list[float], seconds: dict[int, float]) -> int:
    """The k (0: autoregressive) with the most expected tokens per second, given a step's cost."""
    return max(seconds, key=lambda k: expected_tokens(k, survival) / seconds[k])


def measure_step_seconds(model: Transformer, steps: dict[int, Callable], batch_size: int, repeats: int = 7) -> dict[int, float]:
    """Seconds of one step at each k on this model, device and batch size: the median of a few
    timed passes on placeholder tokens, each ending with the read back a real step ends with. Each
    k's passes run in a row, after one untimed: a step that follows a step of another k pays for
    the switch (on a 2-core Xeon an autoregressive step of the demo took 2.4-2.6 ms after a k = 6
    step, 1.7 ms after another one), and the loop mostly repeats the k it chose. The caches must be
    set up; what the passes write is overwritten later."""
    device = model.tok_embeddings.weight.device
    times = {k: [] for k in steps}
    with torch.inference_mode():  # inference tensors, as in the loop: others would not match the compiled guards
        token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        for k, step in steps.items():
            for call in range(repeats + 1):  # the first is not timed: it pays one-off costs and the switch
                t0 = time.perf_counter()
                step(model, token, pos)[1].tolist()
                if call:
                    times[k].append(time.perf_counter() - t0)
    return {k: sorted(t)[repeats // 2] for k, t in times.items()}


class AdaptiveK:
    """Picks each step's k: `choose()` before the step, `observe()` after it.

    It keeps, for each draft position j, the share of the drafts reaching j that were accepted,
    counted with geometrically fading weights so that it follows the text: a running acceptance
    rate per position. Acceptance comes in runs - after some right drafts the next one is more
    often right - which one rate for every position would miss, undervaluing long steps. The
    chance that drafts 1..j are all accepted is the product of those rates. Step costs are
    measure_step_seconds', at position 0: in the loop a step costs more (attention reads the filled
    part of the cache; host work), a drafting step more so - on the demo AR 14%, k = 6 23% - but
    pricing steps as in the loop chose no better in a replay of its HumanEval prompts. When
    an autoregressive step wins, no draft is judged and nothing can change, so every `wait` such
    steps a step of the second-smallest k (2 of AUTO_K) probes the text again, the first one at
    once: two drafts are the fewest that can see a run of right drafts, which a one-draft probe never
    would, and each longer draft is one more the text that made AR win will likely refuse (probes of
    four drafts took up to 15% of the demo's hardest HumanEval prompts). A probe that does not bring
    drafting back doubles the wait (up to `max_wait`).
    """

    def __init__(self, seconds: dict[int, float], prior: float = 0.5, memory: float = 0.8,
                 first_wait: int = 4, max_wait: int = 64):
        self.seconds, self.prior = dict(seconds), prior
        self.reached = [0.0] * (max(seconds) + 1)  # drafts judged at position j (index 0 unused)
        self.accepted = [0.0] * (max(seconds) + 1)  # ... and accepted
        self.memory, self.first_wait, self.max_wait = memory, first_wait, max_wait
        self.wait = self.waited = first_wait  # no evidence yet: if it is AR, probe at once
        drafting = sorted(k for k in seconds if k > 0)
        self.probe, self.probing = drafting[min(1, len(drafting) - 1)], False

    def survival(self) -> list[float]:
        """survival[j]: the estimated chance that drafts 1..j of a step are all accepted. Each
        position's rate holds one draft's worth of belief that it is the rate of the position
        before (`prior` for the first): what is seen up to k carries to positions not yet tried."""
        out, rate = [1.0], self.prior
        for reached, accepted in zip(self.reached[1:], self.accepted[1:]):
            rate = (accepted + rate) / (reached + 1)
            out.append(out[-1] * rate)
        return out

    def choose(self) -> int:
        k = best_k(self.survival(), self.seconds)
        self.probing = k == 0 and self.waited >= self.wait
        return self.probe if self.probing else k

    def observe(self, k: int, accepted: list[int]) -> None:
        """accepted: each active row's accepted drafts in the step just taken with k."""
        if k == 0:
            self.waited += 1
            return
        self.reached = [self.memory * x for x in self.reached]
        self.accepted = [self.memory * x for x in self.accepted]
        for n in accepted:  # drafts 1..n accepted; draft n + 1, if there was one, judged and refused
            for j in range(1, min(n + 1, k) + 1):
                self.reached[j] += 1
                self.accepted[j] += j <= n
        if self.probing:  # drafting resumes, or AR waits longer before the next probe
            self.wait = self.first_wait if best_k(self.survival(), self.seconds) else min(2 * self.wait, self.max_wait)
        self.waited = 0


class PerRowK:
    """--speculate_k auto for a server. A row whose text must not depend on what shares its batch
    (seeded sampling: `own`) has its own AdaptiveK, which hears only that row's acceptance and
    prices steps at the full batch's costs; the other rows (greedy, whose tokens do not depend on
    k, and unseeded sampling) follow one AdaptiveK for all of them, priced at the costs of a step
    on as many rows as the next step runs (step_rows()). A step drafts the most any of them asks
    for, and each row takes at most its own k (speculative_step's limit: this object's tensor).
    seconds: {rows a step runs on: {k: seconds}}. start(row, own) / end(row) as a text takes and
    leaves a row."""

    def __init__(self, seconds: dict[int, dict[int, float]], limit: Tensor, step_rows: Callable[[], int]):
        self.seconds, self.limit, self.step_rows = seconds, limit, step_rows
        self.full = seconds[max(seconds)]
        self.shared, self.others = AdaptiveK(self.full), set()
        self.own: dict[int, AdaptiveK] = {}
        self.chosen: dict[int, int] = {}  # the last step's k per row, in row order (as observe's counts)
        self.shared_k: Optional[int] = None  # the shared policy's k in the last step (None: it had no rows)

    def start(self, row: int, own: bool) -> None:
        if own:
            self.own[row] = AdaptiveK(self.full)
        else:
            self.others.add(row)

    def end(self, row: int) -> None:
        self.own.pop(row, None)
        self.others.discard(row)

    def choose(self) -> int:
        chosen = {row: policy.choose() for row, policy in self.own.items()}
        self.shared_k = None
        if self.others:
            self.shared.seconds = self.seconds[self.step_rows()]
            self.shared_k = self.shared.choose()
            chosen.update((row, self.shared_k) for row in self.others)
        self.chosen = dict(sorted(chosen.items()))
        self.limit.copy_(torch.tensor([self.chosen.get(row, 0) for row in range(len(self.limit))]))
        return max(self.chosen.values(), default=0)

    def observe(self, k: int, accepted: list[int]) -> None:
        shared = []
        for (row, row_k), n in zip(self.chosen.items(), accepted):
            if row in self.own:  # not ended in this step
                self.own[row].observe(row_k, [n])
            elif row in self.others:
                shared.append(n)
        if self.shared_k is not None:
            self.shared.observe(self.shared_k, shared)


def speculative_generate(model: Transformer, prompt: Tensor, max_new_tokens: int, k: Union[int, str], *,
                         temperature: float, top_k: Optional[int], stop_ids: set[int],
                         prefill_fn: Callable = prefill, step_fn: Callable = speculative_step,
                         on_tokens: Optional[Callable[[int, list[int], list[bool]], None]] = None
                         ) -> tuple[list[int], dict]:
    """One prompt: prefill with the full model, then steps until EOS (kept) or max_new_tokens;
    k drafts per step, or "auto" (AdaptiveK over AUTO_K, costs measured here).

    The model's caches must be set up with the exit layer and max(k) + 1 positions of slack.
    Returns the tokens and {"acceptance_rate", "tokens_per_step", "k_steps"}.
    """
    steps = speculative_steps(AUTO_K if k == "auto" else (k,), temperature, top_k, step_fn)
    policy = AdaptiveK(measure_step_seconds(model, steps, 1)) if k == "auto" else None
    result = generate_batch(
        model, [prompt.tolist()], max_new_tokens, stop_ids=stop_ids, on_tokens=on_tokens, policy=policy,
        prefill_fn=partial(prefill_fn, temperature=temperature, top_k=top_k), steps=steps)[0]
    return result["generated_tokens"], {key: result[key] for key in ("acceptance_rate", "tokens_per_step", "k_steps")}
