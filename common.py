"""What the command lines share, below all of them: sampling, prefill, the decode step, the batched
generation loop, the checkpoint writer, and the one-line error and atomic write every tool uses.

The loop runs B rows of a static batch, each row at its own position. A step - one autoregressive
token, or a self-speculative draft/verify/accept from self_spec.py - advances every row by its
own count; the host reads the step's results back once for the whole batch. A row that ends
(EOS or its token budget) is refilled with the next prompt, prefilled into that row of the caches
while the other rows keep their place, so a long prompt never holds the batch hostage.
"""
import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor

import cpu_kernels
from model import ModelArgs, Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fail(message: str) -> None:
    """The one way a tool reports bad input: one line on stderr, exit status 1."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary name beside `path`, then rename: `path` is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# what a tokenizer file needs beside it (tokenizer.json: its BOS/EOS names; any kind: the stop ids, a chat template)
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "stop_ids.json", "chat_template.jinja")


def save_checkpoint(out_dir: Path, args: ModelArgs, state: dict, tokenizer: Path,
                    weights_file: str = "model.pth") -> None:
    """The engine's format: model_config.json, the tokenizer file (tokenizer.model or tokenizer.json)
    with its companions found beside it, and the weights (model.pth, or a quantized state's file)
    side by side.

    Each file is written under a temporary name and renamed, the weights last: their presence means
    the write finished. A tied head is the embedding, so it is stored once.
    """
    if args.tie_embeddings:
        state = {name: w for name, w in state.items() if name != "output.weight"}
    atomic_write(out_dir / "model_config.json", args.save)
    tokenizer = Path(tokenizer)
    for source in [tokenizer] + [tokenizer.parent / name for name in TOKENIZER_COMPANIONS]:
        target = out_dir / source.name
        if source.is_file() and source.resolve() != target.resolve():
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    atomic_write(out_dir / weights_file, lambda tmp: torch.save(state, tmp))


def check_device(device: str) -> None:
    if device.split(":")[0] not in ("cpu", "cuda"):
        fail(f"unknown device {device!r}: use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda asked for, but no CUDA device is available")


def check_exit_layer(flag: str, exit_layer: int, n_layer: int) -> None:
    """An exit needs at least one layer on each side: [0, E) drafts, [E, L) verifies."""
    if not 1 <= exit_layer < n_layer:
        fail(f"{flag} must be between 1 and {n_layer - 1} for this {n_layer}-layer model, got {exit_layer}")


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights read per full forward: every parameter and quantized weight, but the
    embedding table (a lookup reads one row) unless the head reads it too, and the draft head
    (its rows are a copy of the head's, read by drafts only)."""
    head_is_embedding = getattr(model.output, "weight", None) is model.tok_embeddings.weight
    parameters = sum(p.nbytes for name, p in model.named_parameters()
                     if (not name.startswith("tok_embeddings") or head_is_embedding) and not name.startswith("draft_output."))
    quantized = sum(b.nbytes for name, b in model.named_buffers() if not name.startswith("draft_output.")
                    and name.rpartition(".")[2] in ("codes", "scales", "packed", "scales_and_zeros"))
    return parameters + quantized


def completion_text(tokenizer, prompt_tokens: list[int], tokens: list[int]) -> str:
    """The generated text, decoded with its prompt so that the first word keeps its space."""
    return tokenizer.decode(prompt_tokens + tokens)[len(tokenizer.decode(prompt_tokens)):]


def read_prompts_file(path: Path) -> list[dict]:
    """JSONL with a "prompt" field per line (other fields are kept), or plain text with one prompt
    per line; blank lines are skipped. Raises ValueError naming the line that is wrong."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path}: {e}") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise ValueError(f"prompts file {path} has no prompts")
    if not numbered[0][1].lstrip().startswith("{"):
        return [{"prompt": line} for _, line in numbered]
    entries = []
    for number, line in numbered:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f'{path}, line {number}: a JSON object with a "prompt" string is needed')
        entries.append(entry)
    return entries


def cache_length(prompt_lengths: list[int], max_new_tokens: int, context: int, slack: int) -> int:
    """Positions the caches need: the longest prompt + its tokens, within the context, + the slack
    a self-speculative step may write past the final token (k + 1)."""
    return max(min(n + max_new_tokens, context) for n in prompt_lengths) + slack


# --- sampling ------------------------------------------------------------------------------------

def per_row(setting: Tensor, like: Tensor) -> Tensor:
    """A per-row setting (B,) shaped to broadcast over `like` (B, ..., V)."""
    return setting.view(-1, *[1] * (like.dim() - 1))


def logits_to_probs(logits: Tensor, temperature: Union[float, Tensor], top_k: Union[int, None, Tensor],
                    top_p: Optional[Tensor] = None) -> Tensor:
    """Sampling distribution over the last dim; temperature 0 is the one-hot argmax (greedy).

    The settings are numbers, the same for every row and compiled into the graph as constants, or
    tensors (B,) with one value per row of logits (B, ..., V) - temperature (0: greedy), top_k (0:
    off) and top_p (1: off) - so that rows sampling differently (a server's requests) share one
    compiled step. Greedy rows are one-hot there too: a greedy row's tokens do not depend on its
    neighbours' settings.
    """
    if isinstance(temperature, Tensor):
        return row_probs(logits, temperature, top_k, top_p)
    if temperature == 0:
        return torch.nn.functional.one_hot(greedy_tokens(logits), logits.shape[-1]).to(torch.float32)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = torch.where(logits < kth, -float("inf"), logits)
    return torch.softmax(logits, dim=-1)


def row_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """logits_to_probs with a setting per row. One sort of each row's logits serves both filters:
    top-k keeps the k largest, top-p then the fewest largest whose probability reaches top_p."""
    greedy = per_row(temperature == 0, logits)
    scaled = logits.float() / per_row(torch.where(temperature > 0, temperature, 1.0), logits)
    ordered = scaled.sort(dim=-1, descending=True).values
    vocab = logits.shape[-1]
    k = per_row(torch.where(top_k > 0, top_k.clamp(max=vocab), vocab), logits)
    kth = ordered.gather(-1, (k - 1).expand(*logits.shape[:-1], 1))
    ordered_probs = torch.softmax(torch.where(ordered < kth, -float("inf"), ordered), dim=-1)
    mass_before = ordered_probs.cumsum(-1) - ordered_probs  # of the tokens ranked above each one
    kept = mass_before < per_row(top_p, logits)  # the first is always kept: nothing is above it
    threshold = torch.maximum(torch.where(kept, ordered, float("inf")).amin(-1, keepdim=True), kth)
    probs = torch.softmax(torch.where(scaled < threshold, -float("inf"), scaled), dim=-1)
    one_hot = torch.nn.functional.one_hot(greedy_tokens(logits), vocab).to(torch.float32)
    return torch.where(greedy, one_hot, probs)


# What a row's random draw is for: its draws are a function of (seed, position, purpose, index) alone.
TOKEN, DRAFT, ACCEPT = 0, 1, 2
_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) in int64 arithmetic that never overflows."""
    x = x & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def row_uniform(seed: Tensor, position: Tensor, purpose: int, n: Optional[int] = None) -> Tensor:
    """Uniform draws in (0, 1) from each row's own random stream, counter-based: a function of the
    row's seed (B,), the position (B, ...) of the token they decide, what they decide (TOKEN, DRAFT,
    ACCEPT) and, with n, an index 0..n-1 in a last dim. So a seeded row's tokens do not depend on
    what shares its batch or how its steps fell; and a draw is never reused for what it decided:
    a position's token draws decide it once, and a draft's draws are drawn again only after that
    draft was thrown away unjudged."""
    seed = per_row(seed, position)
    key = _mix32(_mix32(seed) ^ (seed >> 32))
    key = _mix32(key ^ _mix32(position * 4 + purpose))
    if n is not None:
        key = _mix32(key[..., None] ^ _mix32(torch.arange(n, device=position.device) + 0x9E3779B))
    # 23 random bits and a half: exact in float32 (24 significant bits), so never 0 or 1. With 24 bits the
    # largest rounded up to 1: an exponential of 0 in sample_from_probs, 0 / 0 there, a token of probability 0.
    return ((key >> 9).float() + 0.5) * 2.0 ** -23


def sample_from_probs(probs: Tensor, seed: Optional[Tensor] = None, position: Optional[Tensor] = None,
                      purpose: int = TOKEN) -> Tensor:
    """One draw from probs over the last dim: from torch's generator, or with seed (B,) from each
    row's own stream (row_uniform) for the tokens at `position`."""
    # argmax(p / Exp(1)) draws from p (the exponential-race trick) without the host sync that
    # torch.multinomial makes; on a one-hot p it returns the argmax exactly.
    if seed is None:
        exponential = torch.empty_like(probs).exponential_(1)
    else:
        exponential = -torch.log(row_uniform(seed, position, purpose, probs.shape[-1]))
    return torch.argmax(probs / exponential, dim=-1)


def is_greedy(temperature: Union[float, Tensor]) -> bool:
    """Whether every row is greedy by a setting fixed for the whole graph (a number, not per-row tensors)."""
    return not isinstance(temperature, Tensor) and temperature == 0


def greedy_tokens(logits: Tensor) -> Tensor:
    """argmax over the last dim (the first of equal maxima). Written as a max and the least index
    that holds it: inductor writes an argmax over bfloat16 logits as scalar code, a max and a min
    as vector code (a 128256-token row: 84 us against 358 on two threads)."""
    vocab = logits.shape[-1]
    index = torch.arange(vocab, device=logits.device)
    first = torch.where(logits == logits.amax(-1, keepdim=True), index, vocab).amin(-1)
    return first.clamp(max=vocab - 1)  # a row of NaN has no maximum: keep its token a valid id


def next_tokens(logits: Tensor, temperature: Union[float, Tensor], top_k: Union[int, None, Tensor],
                top_p: Optional[Tensor] = None, seed: Optional[Tensor] = None, position: Optional[Tensor] = None,
                purpose: int = TOKEN) -> Tensor:
    """A draw from logits over the last dim, as sample_from_probs(logits_to_probs(...)) makes it.
    Greedy is the argmax itself: the same token without a one-hot and a random race over the
    vocabulary (for a 128k vocabulary, 512 KB a row)."""
    if is_greedy(temperature):
        return greedy_tokens(logits)
    return sample_from_probs(logits_to_probs(logits, temperature, top_k, top_p), seed, position, purpose)


def settings_for(rows: Tensor, temperature, top_k, top_p, seed) -> tuple:
    """The per-row settings of cache rows `rows`; numbers pass through."""
    return tuple(s[rows] if isinstance(s, Tensor) else s for s in (temperature, top_k, top_p, seed))


# --- prefill and the autoregressive step -----------------------------------------------------------

def model_hidden(model: Transformer, idx: Tensor, input_pos: Tensor, early_exit: bool,
                 rows: Optional[Tensor] = None) -> Tensor:
    """The hidden state the shared head reads: the full model's, or with early_exit layers [0, E)'s."""
    h = model.early(idx, input_pos, rows)
    return h if early_exit else model.late(h, input_pos, rows)


def model_logits(model: Transformer, idx: Tensor, input_pos: Tensor, early_exit: bool,
                 rows: Optional[Tensor] = None) -> Tensor:
    """Full model, or with early_exit only layers [0, E) + the shared head (lossy)."""
    return model.head(model_hidden(model, idx, input_pos, early_exit, rows))


def right_padded(prompts: list[list[int]], device: Union[str, torch.device] = "cpu") -> tuple[Tensor, Tensor]:
    """Prompts as one (b, longest) tensor, each padded with zeros past its end, and their lengths
    (b,): what prefill takes."""
    idx = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        idx[i, : len(prompt)] = torch.tensor(prompt)
    return idx.to(device), torch.tensor([len(prompt) for prompt in prompts], device=device)


def prefill(model: Transformer, idx: Tensor, lengths: Tensor, rows: Tensor, temperature: Union[float, Tensor],
            top_k: Union[int, None, Tensor], early_exit: bool = False, top_p: Optional[Tensor] = None,
            seed: Optional[Tensor] = None) -> Tensor:
    """Prompts idx (b, T), right-padded to the longest, into cache rows `rows`; returns each row's
    first generated token (b,). Padding sits past each prompt's end, where the position mask hides
    it until decoding overwrites it. Per-row settings (tensors) hold a value for every cache row."""
    temperature, top_k, top_p, seed = settings_for(rows, temperature, top_k, top_p, seed)
    input_pos = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], -1)
    with cpu_kernels.prompt_pass():  # the head below has a row a prompt: the kernels' case
        hidden = model_hidden(model, idx, input_pos, early_exit, rows)
    # the head, the largest layer (128k rows for Llama 3), on each prompt's last position only
    last = model.head(hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1])
    return next_tokens(last, temperature, top_k, top_p, seed, lengths)


def decode_one_token(model: Transformer, token: Tensor, pos: Tensor, temperature: Union[float, Tensor],
                     top_k: Union[int, None, Tensor], early_exit: bool = False, top_p: Optional[Tensor] = None,
                     seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One autoregressive token for every row: token (B, 1) at pos (B,). Returns what a
    self-speculative step returns, with no drafts: (out (B, 1), accepted (B,) = 0, next token,
    next position)."""
    logits = model_logits(model, token, pos[:, None], early_exit)[:, -1]
    next_token = next_tokens(logits, temperature, top_k, top_p, seed, pos + 1)[:, None]
    return next_token, torch.zeros_like(pos), next_token, pos + 1


# --- the batched loop ---------------------------------------------------------------------------

def generate_batch(model: Transformer, prompts: Iterable[list[int]], max_new_tokens: int, *,
                   prefill_fn: Callable, steps: dict[int, Callable], stop_ids: set[int], batch_size: int = 1,
                   policy=None, on_tokens: Optional[Callable[[int, list[int], list[bool]], None]] = None,
                   on_done: Optional[Callable[[dict], None]] = None,
                   stop: Optional[Callable[[int, list[int]], bool]] = None,
                   admit: Optional[Callable[[int, int], None]] = None) -> list[dict]:
    """Generates for every prompt, `batch_size` rows at a time; returns one result per prompt, in
    the prompts' order.

    prompts may be an iterator that has none ready now and more later (a server's queue): its
    StopIteration ends nothing; the loop asks again whenever a row is free, and returns once every
    row is free and it has none. admit(index, row) is called as a prompt takes cache row `row`,
    before its prefill (a server writes the row's sampling settings there).

    prefill_fn(model, idx, lengths, rows) -> first tokens, and steps {k: step(model, token, pos)}
    (k = 0: autoregressive) come with their sampling settings bound. With several steps a policy
    picks k before each step (`choose()`) and hears how it went (`observe(k, accepted per row)`).
    Each prompt stops after any of stop_ids (its EOS ids; kept), max_new_tokens (fewer where its
    context ends) or when stop(index, tokens) says so (a stop sequence; tokens accepted in the same
    step stay). The caches must be set up for batch_size rows and the longest prompt + its tokens +
    max(k) + 1 positions.

    on_tokens(index, new_tokens, from_draft) streams; on_done(result) is called as each prompt ends
    with prompt_tokens, generated_tokens, seconds, tokens_per_sec, acceptance_rate, tokens_per_step
    and k_steps ({k: steps taken with k}, 0 for autoregressive steps).
    """
    device = model.tok_embeddings.weight.device
    context = model.args.max_seq_length
    token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    pos = torch.zeros(batch_size, dtype=torch.long, device=device)
    rows: list[Optional[dict]] = [None] * batch_size  # the prompt each row is generating, or None
    idle_rows, idle = None, None
    queue, taken = iter(prompts), 0
    results = []

    def finish(r: int) -> None:
        row, rows[r] = rows[r], None
        seconds = time.perf_counter() - row["start"]
        tokens = row["tokens"]
        result = {"index": row["index"], "prompt_tokens": row["prompt"], "generated_tokens": tokens,
                  "seconds": seconds, "tokens_per_sec": len(tokens) / seconds,
                  "acceptance_rate": row["accepted"] / row["drafted"] if row["drafted"] else None,
                  "tokens_per_step": (len(tokens) - 1) / sum(row["k_steps"].values()) if row["drafted"] else None,
                  "k_steps": row["k_steps"]}
        results.append(result)
        if on_done:
            on_done(result)

    def add(r: int, new: list[int], from_draft: list[bool]) -> None:
        """Appends a row's new tokens up to EOS or its budget; frees the row when it is done."""
        row = rows[r]
        ends = [i for i, t in enumerate(new) if t in stop_ids]
        if ends:
            new = new[: ends[0] + 1]
        new = new[: row["budget"] - len(row["tokens"])]
        row["tokens"] += new
        if on_tokens:
            on_tokens(row["index"], new, from_draft[: len(new)])
        if row["tokens"][-1] in stop_ids or len(row["tokens"]) == row["budget"] or (stop and stop(row["index"], row["tokens"])):
            finish(r)

    def refill() -> None:
        """Prefills the next prompts into the free rows, all of them in one padded pass."""
        nonlocal taken
        while None in rows:
            starting = []
            for r in [r for r, row in enumerate(rows) if row is None]:
                prompt = next(queue, None)
                if prompt is None:
                    break
                starting.append((r, (taken, prompt)))
                if admit:
                    admit(taken, r)
                taken += 1
            if not starting:
                return
            start = time.perf_counter()
            idx, lengths = right_padded([prompt for _, (_, prompt) in starting], device)
            where = torch.tensor([r for r, _ in starting], device=device)
            first = prefill_fn(model, idx, lengths, where)
            token[where, 0] = first
            pos[where] = lengths
            for (r, (index, prompt)), t in zip(starting, first.tolist()):
                rows[r] = {"index": index, "prompt": prompt, "tokens": [], "start": start, "k_steps": {},
                           "drafted": 0, "accepted": 0, "budget": min(max_new_tokens, context - len(prompt))}
                add(r, [t], [False])  # may finish at once: EOS first, or a budget of one token

    refill()
    while any(row is not None for row in rows):
        # Rows with nothing to do step along with the others (the shapes are fixed); parked at
        # position 0 they can never run past the end of the cache, and their output is ignored.
        if idle_rows != [row is None for row in rows]:  # copied to the device only when it changes
            idle_rows = [row is None for row in rows]
            idle = torch.tensor(idle_rows, device=device)
        if any(idle_rows):
            pos.masked_fill_(idle, 0)
        k = policy.choose() if policy else next(iter(steps))
        out, n, next_token, next_pos = steps[k](model, token, pos)
        # A CUDA graph overwrites its outputs on the next replay: keep our own copies.
        token, pos = next_token.clone(), next_pos.clone()
        readback = torch.cat([n[:, None], out], 1).tolist()  # the step's one read back to the host
        accepted = []
        for r, (n_r, *out_r) in enumerate(readback):
            if rows[r] is None:
                continue
            rows[r]["k_steps"][k] = rows[r]["k_steps"].get(k, 0) + 1
            rows[r]["drafted"] += k
            rows[r]["accepted"] += n_r
            accepted.append(n_r)
            add(r, out_r[: n_r + 1], [True] * n_r + [False])
        if policy:
            policy.observe(k, accepted)
        refill()
    return sorted(results, key=lambda result: result["index"])


def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, temperature: float,
             top_k: Optional[int], stop_ids: set[int], prefill_fn: Callable = prefill,
             decode_fn: Callable = decode_one_token, early_exit: bool = False,
             on_tokens: Optional[Callable[[int, list[int], list[bool]], None]] = None) -> tuple[list[int], dict]:
    """One prompt, autoregressive (or early-exit only): its tokens and stats, from generate_batch."""
    result = generate_batch(
        model, [prompt.tolist()], max_new_tokens, stop_ids=stop_ids, on_tokens=on_tokens,
        prefill_fn=partial(prefill_fn, temperature=temperature, top_k=top_k, early_exit=early_exit),
        steps={0: partial(decode_fn, temperature=temperature, top_k=top_k, early_exit=early_exit)})[0]
    return result["generated_tokens"], {"acceptance_rate": None, "tokens_per_step": None}
