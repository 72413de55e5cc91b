"""Train a LayerSkip model: layer dropout + early-exit loss on the engine's own model.py.

The recipe of the LayerSkip paper (Elhoushi et al., 2024), so that the first layers of the model can
already predict the next token through the one shared final norm + LM head, which is what
self-speculative decoding (self_spec.py) drafts with:
- layer dropout: each sample of a batch skips layer l with probability p_l = S(t) * D(l) * p_max,
  D rising with depth (exponential or linear), S a constant or an exponential ramp over training;
- early-exit loss: the cross-entropy of every layer's hidden state through model.head, weighted so
  that deeper layers weigh more, normalised, and switched on by a curriculum (none: every exit at
  every step; rotational: an exit every R layers, rotating with the step; gradual: from the last
  layer down, all on by a chosen fraction of training). The last layer is always on.

From scratch (a new SentencePiece tokenizer is trained on the data) or from a converted checkpoint
(--init_checkpoint). Output: model.pth + model_config.json + tokenizer.model in --out_dir, which
generate.py loads as it is, plus train_state.pt (weights and optimizer) for --resume.

    python train.py --out_dir out                                # from scratch on the stdlib source
    python train.py --init_checkpoint ckpt/model.pth --data notes/ --out_dir tuned
    python train.py --eval_only --checkpoint_path out/model.pth  # per-layer accuracy and loss
"""
import argparse
import hashlib
import io
import math
import sys
import sysconfig
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from common import DTYPES, atomic_write, fail, save_checkpoint
from model import ModelArgs, Transformer, load_model
from self_spec import draft_vocab_ids
from tokenizer import load_tokenizer, tokenizer_file

STATE_FILE = "train_state.pt"  # weights in float32 + optimizer state + step, for --resume


# ----------------------------------------------------------------------------- the recipe


def dropout_rates(step: int, steps: int, n_layer: int, p_max: float, depth: str, schedule: str) -> Tensor:
    """p_l = S(t) * D(l) * p_max for every layer l at step t, as a float tensor of shape (n_layer,).

    D(l) = exp(l ln2 / (L-1)) - 1 (exp) or l / (L-1) (linear): 0 for the first layer, 1 for the last.
    S(t) = 1 (constant) or exp(t ln2 / (T-1)) - 1 (exp, the paper's ramp for pretraining from scratch:
    no dropout at the start, where it would only slow down learning, p_max at the end).
    """
    l = torch.arange(n_layer, dtype=torch.float64)
    scale = l / max(n_layer - 1, 1)
    d = torch.exp(scale * math.log(2)) - 1 if depth == "exp" else scale
    s = math.exp(step * math.log(2) / max(steps - 1, 1)) - 1 if schedule == "exp" else 1.0
    return (s * d * p_max).float()


def exits_on(step: int, steps: int, n_layer: int, curriculum: str, rotation: int, gradual_fraction: float) -> Tensor:
    """The curriculum C(t, l): which layers' early-exit losses count at step t (bool, shape (n_layer,))."""
    l = torch.arange(n_layer)
    if curriculum == "none":  # no curriculum: every exit at every step
        on = torch.ones(n_layer, dtype=torch.bool)
    elif curriculum == "rotational":  # every R-th layer, the set shifting by one layer each step
        on = (l % rotation) == (step % rotation)
    elif curriculum == "gradual":  # layer l joins at step fraction * T * (L - l) / L: last first, all by fraction * T
        on = torch.tensor([step >= gradual_fraction * steps * (n_layer - i) / n_layer for i in range(n_layer)])
    else:
        raise ValueError(f"unknown curriculum {curriculum!r}")
    on[-1] = True  # the full model's own loss is always trained
    return on


def exit_weights(on: Tensor, e_scale: float, loss_scale: str) -> Tensor:
    """Normalised weight of each layer's early-exit loss; 0 where the curriculum has the exit off.

    As in the LayerSkip code (torchtune's early_exit_loss): layer l, numbered n = l + 1, gets
    f(n) = n(n+1)/2 (sum_l, the paper's sum over i <= n), n (l) or 1 (one); early layers are scaled by
    e_scale, the last layer by 1; then the weights of the layers that are on are normalised to
    sum to 1. e_scale 0 is the plain language-model loss of the last layer.
    """
    n = torch.arange(1, len(on) + 1, dtype=torch.float64)
    f = {"sum_l": n * (n + 1) / 2, "l": n, "one": torch.ones_like(n)}[loss_scale]
    scale = torch.full_like(n, e_scale)
    scale[-1] = 1.0
    w = f * scale * on
    return (w / w.sum()).float()


def layer_keep_mask(model: Transformer, rates: Tensor, batch: int, g: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """Which samples run which layers: keep[b, l] is False with probability rates[l], independently per
    sample and layer. None (every layer runs) when the model is in eval mode or nothing is dropped."""
    if not model.training or float(rates.max()) == 0:
        return None
    return torch.rand(batch, len(rates), generator=g) >= rates


def run_layers(model: Transformer, idx: Tensor, keep: Optional[Tensor] = None) -> list[Tensor]:
    """Embeddings then every layer on whole sequences (causal, no KV cache); the hidden state after each layer.

    keep (bool, batch x n_layer) is the layer-dropout mask: where keep[b, l] is False, sample b skips
    layer l and its hidden state passes through unchanged. Only the kept samples are run through a
    layer, so dropout also saves their compute.
    """
    x = model.tok_embeddings(idx)
    rope = model.rope[: idx.shape[1]]
    hidden = []
    for l, layer in enumerate(model.layers):
        if keep is None or bool(keep[:, l].all()):
            x = layer(x, rope, None, None)
        else:
            rows = keep[:, l].nonzero().squeeze(1)
            if len(rows):  # out-of-place index_copy: the skipped rows keep their input, autograd sees both
                x = x.index_copy(0, rows, layer(x.index_select(0, rows), rope, None, None))
        hidden.append(x)
    return hidden


def early_exit_loss(model: Transformer, hidden: list[Tensor], targets: Tensor, weights: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
    """sum_l w_l * CE(head(h_l), targets); the head is only run for the exits that are on.

    Returns the weighted loss and the loss of each layer that was on (detached, for logging:
    read them only when printing, each read waits for the GPU).
    """
    total, per_layer = 0.0, {}
    for l, h in enumerate(hidden):
        if weights[l] == 0:
            continue
        logits = model.head(h)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        total = total + weights[l].item() * loss  # weights live on the CPU: no sync
        per_layer[l] = loss.detach()
    return total, per_layer


# ----------------------------------------------------------------------------- data


def default_data() -> list[Path]:
    return [Path(sysconfig.get_paths()["stdlib"])]


def list_files(paths: list[Path], pattern: str) -> list[Path]:
    """Files given as such, and the files matching `pattern` under each folder (sorted: deterministic)."""
    files = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            # installed packages are not part of the standard library; caches and hidden folders are no source
            skip = {"site-packages", "dist-packages", "__pycache__"}
            found = sorted(
                f for f in path.rglob(pattern)
                if f.is_file() and not skip & set(f.relative_to(path).parts) and not any(p.startswith(".") for p in f.relative_to(path).parts)
            )
            if not found:
                raise ValueError(f"no files matching {pattern!r} under {path}")
            files += found
        else:
            raise FileNotFoundError(f"data path not found: {path}")
    return files


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")  # a stray byte should not end a long run
        if text.strip():
            texts.append(text)
    if not texts:
        raise ValueError("the data is empty")
    return texts


def is_held_out(text: str, val_fraction: float) -> bool:
    """A document's side of the split, from a hash of its content: the same on every machine and every
    run, and copies of one file always land on the same side."""
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8", errors="replace")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def train_tokenizer(texts: list[str], vocab_size: int, path: Path, threads: int = 1) -> None:
    """A new Llama-2-style SentencePiece BPE model (unk 0, bos 1, eos 2, byte fallback) written to `path`.

    Whitespace is kept as it is (identity normalisation, no stripping), so code round-trips exactly:
    indentation becomes whitespace pieces, a newline the byte token <0x0A>.
    """
    import sentencepiece as spm

    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, character_coverage=0.9995,
            input_sentence_size=1_000_000, shuffle_input_sentence=True, num_threads=threads, minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is too high" for a small text
        raise ValueError(f"cannot train a tokenizer with --vocab_size {vocab_size} on this data: {str(e).strip().splitlines()[-1]}") from None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(model.getvalue()))


def encode(tokenizer, texts: list[str]) -> Tensor:
    """One token stream: <s> document </s> <s> document </s> ..."""
    ids = []
    for text in texts:
        ids += tokenizer.encode(text, bos=True) + [tokenizer.eos_id]
    return torch.tensor(ids, dtype=torch.int32)


def load_data(paths: list[Path], pattern: str, val_fraction: float) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts), split by document hash.

    With too few documents for both sides (one text file, say), the last val_fraction of the
    characters of every document is held out instead.
    """
    texts = read_texts(list_files(paths, pattern))
    train = [t for t in texts if not is_held_out(t, val_fraction)]
    val = [t for t in texts if is_held_out(t, val_fraction)]
    if not train or not val:
        cut = [int(len(t) * (1 - val_fraction)) for t in texts]
        train, val = [t[:c] for t, c in zip(texts, cut)], [t[c:] for t, c in zip(texts, cut)]
    return train, val


def get_batch(tokens: Tensor, batch: int, seq_len: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows of the training stream: inputs and the next tokens."""
    starts = torch.randint(0, len(tokens) - seq_len, (batch,), generator=g)
    rows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]


def eval_windows(tokens: Tensor, seq_len: int, max_tokens: int) -> Tensor:
    """Non-overlapping held-out windows of seq_len + 1 tokens, spread evenly over the whole stream."""
    seq_len = min(seq_len, len(tokens) - 1)
    if seq_len < 1:
        raise ValueError("the held-out data is too short: add data or raise --val_fraction")
    n_all = (len(tokens) - 1) // seq_len
    n = max(1, min(n_all, max_tokens // seq_len))
    picks = torch.linspace(0, n_all - 1, n).round().long().tolist()
    return torch.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in picks]).long()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_layers(model: Transformer, windows: Tensor, batch: int = 8, device: str = "cpu",
                    draft_vocabs: Optional[dict[int, Tensor]] = None) -> list[dict]:
    """Loss and next-token accuracy when exiting after each layer (through the shared norm + head).

    Also the agreement: how often the exit's greedy token equals the full model's, which is the
    chance that a greedy self-speculative draft from that layer is accepted. With draft_vocabs
    ({name: kept token ids}), "kept": {name: how often the argmax over the kept tokens equals the exit's
    argmax over all}, the share of that exit's drafts a draft head over them leaves unchanged.
    """
    was_training = model.training
    model.eval()
    n_layer = model.args.n_layer
    loss_sum, correct, agree = (torch.zeros(n_layer, dtype=torch.float64) for _ in range(3))
    draft_vocabs = {n: ids.to(device) for n, ids in (draft_vocabs or {}).items()}
    kept = {n: torch.zeros(n_layer, dtype=torch.float64) for n in draft_vocabs}
    count = 0
    for i in range(0, len(windows), batch):
        rows = windows[i : i + batch].to(device)
        x, y = rows[:, :-1], rows[:, 1:]
        with autocast(device):
            hidden = run_layers(model, x)
            final_logits = model.head(hidden[-1]).float()
            final = final_logits.argmax(-1)
            for l, h in enumerate(hidden):
                logits = final_logits if l == n_layer - 1 else model.head(h).float()
                loss_sum[l] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
                correct[l] += (logits.argmax(-1) == y).sum().item()
                agree[l] += (logits.argmax(-1) == final).sum().item()
                for n, ids in draft_vocabs.items():
                    kept[n][l] += (ids[logits[..., ids].argmax(-1)] == logits.argmax(-1)).sum().item()
        count += y.numel()
    model.train(was_training)
    return [{"layer": l + 1, "loss": loss_sum[l].item() / count, "accuracy": correct[l].item() / count,
             "agreement": agree[l].item() / count, "kept": {n: kept[n][l].item() / count for n in kept}}
            for l in range(n_layer)]


def format_table(results: dict[str, list[dict]]) -> str:
    """A markdown table: one row per exit layer; loss, accuracy and agreement with the last layer per model."""
    names = list(results)
    head = "| exit layer | " + " | ".join(f"{n} loss | {n} acc | {n} agree" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(names))]
    for i in range(max(len(r) for r in results.values())):
        cells = []
        for n in names:
            r = results[n]
            cells += [f"{r[i]['loss']:.3f}", f"{100 * r[i]['accuracy']:.1f}%", f"{100 * r[i]['agreement']:.1f}%"] if i < len(r) else [""] * 3
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_kept_table(results: dict[str, list[dict]]) -> str:
    """A markdown table: per exit layer, the share of drafts each draft vocabulary keeps, per model."""
    columns = [(name, n) for name, r in results.items() for n in r[0]["kept"]]
    lines = ["| exit layer | " + " | ".join(f"{name} N = {n}" for name, n in columns) + " |", "|" + "---|" * (1 + len(columns))]
    for i in range(max(len(r) for r in results.values())):
        cells = [f"{100 * results[name][i]['kept'][n]:.1f}%" if i < len(results[name]) else "" for name, n in columns]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_layers(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("accuracy", 100, "next-token accuracy (%)"), ("agreement", 100, "same greedy token as the last layer (%)"),
              ("loss", 1, "cross-entropy loss")]
    for ax, (key, scale, label) in zip(axes, panels):
        for name, r in results.items():
            ax.plot([x["layer"] for x in r], [scale * x[key] for x in r], marker="o", label=name)
        ax.set(xlabel="exit layer", ylabel=label, title=f"{key} when exiting at a layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(buf.getvalue()))


# ----------------------------------------------------------------------------- checkpoints


def save_model(model: Transformer, tokenizer_path: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """The model in the engine's format, its weights cast to `dtype`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    save_checkpoint(out_dir, model.args, state, tokenizer_path)


def init_weights(model: Transformer) -> None:
    """GPT-2 / Llama style: N(0, 0.02), the projections into the residual stream scaled down by
    sqrt(2L) so that the stream does not grow with depth. (nn.Embedding's default N(0, 1), tied to the
    head, would start with huge logits.)"""
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() == 2:
            scale = 1 / math.sqrt(2 * model.args.n_layer) if name.endswith(("wo.weight", "w2.weight")) else 1.0
            torch.nn.init.normal_(p, mean=0.0, std=std * scale)


def lr_at(step: int, steps: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - 1 - warmup, 1)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: Transformer, args) -> torch.optim.AdamW:
    # no weight decay on norms (vectors): decaying a gain towards 0 has no regularising meaning
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def autocast(device: str):
    # bf16 autocast on CUDA (weights and optimizer stay float32); plain float32 on CPU
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()


# ----------------------------------------------------------------------------- training


def build_model(args, tokenizer_path: Path) -> Transformer:
    """From --init_checkpoint (its shape and weights), or a fresh model of the flags' shape."""
    if args.init_checkpoint:
        loaded = load_model(args.init_checkpoint, "cpu", torch.float32)
        model = Transformer(loaded.args)
        model.load_state_dict(loaded.state_dict())  # copied out of the read-only memory map
        return model
    vocab_size = load_tokenizer(tokenizer_path).vocab_size
    model_args = ModelArgs(
        vocab_size=vocab_size, dim=args.dim, n_layer=args.n_layer, n_head=args.n_head,
        n_kv_head=args.n_kv_head or args.n_head, head_dim=args.dim // args.n_head,
        intermediate_size=args.intermediate_size, max_seq_length=args.seq_len, tie_embeddings=True,
    )
    model = Transformer(model_args)
    init_weights(model)
    return model


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, keep: Optional[Tensor],
               weights: Tensor, grad_clip: float, device: str) -> tuple[Tensor, dict[int, Tensor]]:
    """One optimizer step on the batch (x, y): the layers run under the dropout mask `keep`; the loss
    is the early-exit loss with exit weights `weights`. Returns it and the per-layer losses.

    The gradients are set to None rather than zeroed: a layer that every sample of the batch skips
    then has no gradient, and AdamW leaves it alone (no step from its momentum, no weight decay).
    """
    with autocast(device):
        hidden = run_layers(model, x, keep)
        loss, per_layer = early_exit_loss(model, hidden, y, weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss, per_layer


def train(args) -> None:
    out_dir = Path(args.out_dir)  # created by the first write: bad input leaves no empty folder
    device = args.device
    state = None
    if args.resume:
        state_path = out_dir / STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {out_dir}")
        state = torch.load(state_path, map_location="cpu", weights_only=True)

    # tokenizer: kept from the run being resumed, taken from the initial checkpoint, given, or trained here
    tokenizer_path = tokenizer_file(out_dir)
    if state is None and args.init_checkpoint:
        tokenizer_path = tokenizer_file(Path(args.init_checkpoint).parent)
    elif state is None and args.tokenizer:
        tokenizer_path = Path(args.tokenizer)
    new_tokenizer = state is None and not args.init_checkpoint and not args.tokenizer
    if not new_tokenizer and not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {tokenizer_path}")

    t0 = time.time()
    train_texts, val_texts = load_data(args.data, args.glob, args.val_fraction)
    if new_tokenizer:
        print(f"training a {args.vocab_size}-token SentencePiece tokenizer on {len(train_texts)} documents", file=sys.stderr)
        train_tokenizer(train_texts, args.vocab_size, tokenizer_path, args.threads)
    tokenizer = load_tokenizer(tokenizer_path)
    train_tokens, val_tokens = encode(tokenizer, train_texts), encode(tokenizer, val_texts)
    print(f"data: {len(train_texts)} train / {len(val_texts)} held-out documents, {len(train_tokens):,} / "
          f"{len(val_tokens):,} tokens ({time.time() - t0:.0f} s)", file=sys.stderr)
    if len(train_tokens) <= args.seq_len + 1:
        raise ValueError(f"the training data ({len(train_tokens)} tokens) is shorter than --seq_len {args.seq_len}")
    windows = eval_windows(val_tokens, args.seq_len, args.eval_tokens)

    if state is not None:  # the weights and the shape of the run being resumed (model flags are ignored)
        model = Transformer(ModelArgs(**state["model_args"]))
        model.load_state_dict(state["model"])
    else:
        model = build_model(args, tokenizer_path)
    if model.args.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.args.vocab_size}")
    if args.seq_len > model.args.max_seq_length:
        raise ValueError(f"--seq_len {args.seq_len} is longer than the model's context {model.args.max_seq_length}")
    model.to(device).train()
    model.setup_rope(args.seq_len)
    optimizer = make_optimizer(model, args)
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {model.args.n_layer} layers, dim {model.args.dim}; "
          f"steps {start} -> {stop} of {args.steps}, {args.batch_size}x{args.seq_len} tokens each", file=sys.stderr)

    def save_state(step: int) -> None:
        save_model(model, tokenizer_path, out_dir, DTYPES[args.save_dtype])
        state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "model_args": asdict(model.args), "args": {k: str(v) for k, v in vars(args).items()}}
        atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))

    from tqdm import tqdm

    bar = tqdm(range(start, stop), initial=start, total=stop, mininterval=2.0, dynamic_ncols=True, file=sys.stderr)
    tokens_per_sec = 0.0
    for step in bar:
        t_step = time.time()
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the batch and the dropout mask depend only on (seed, step): a resumed run sees what the
        # uninterrupted run would have seen
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x, y = get_batch(train_tokens, args.batch_size, args.seq_len, g)
        rates = dropout_rates(step, args.steps, model.args.n_layer, args.p_max, args.dropout_depth, args.dropout_time)
        keep = layer_keep_mask(model, rates, args.batch_size, g)
        keep = keep.to(device) if keep is not None else None
        on = exits_on(step, args.steps, model.args.n_layer, args.curriculum, args.rotation, args.gradual_fraction)
        weights = exit_weights(on, args.e_scale, args.loss_scale)
        loss, per_layer = train_step(model, optimizer, x.to(device), y.to(device), keep, weights, args.grad_clip, device)

        step_rate = x.numel() / (time.time() - t_step)
        tokens_per_sec = step_rate if step == start else 0.9 * tokens_per_sec + 0.1 * step_rate
        bar.set_postfix(loss=f"{loss.item():.3f}", last=f"{per_layer[model.args.n_layer - 1]:.3f}",
                        lr=f"{lr:.1e}", tok_s=f"{tokens_per_sec:.0f}", refresh=False)
        done = step + 1
        if done % args.eval_interval == 0 and done != args.steps:
            losses = [e["loss"] for e in evaluate_layers(model, windows, device=device)]
            bar.write(f"step {done}: held-out loss per exit layer " + " ".join(f"{v:.3f}" for v in losses))
        if done % args.save_interval == 0 or done == stop:
            save_state(done)
    bar.close()
    if start >= stop:
        save_state(start)
    print(f"trained {stop - start} steps in {time.time() - t0:.0f} s (data preparation included)", file=sys.stderr)
    if stop == args.steps:  # the end of the run: the per-layer table and plot of the checkpoint as written
        final = load_model(out_dir / "model.pth", device, torch.float32)  # save_dtype rounding included
        final.setup_rope(args.seq_len)
        report({out_dir.name or "model": evaluate_layers(final, windows, device=device)},
               Path(args.plot) if args.plot else out_dir / "layer_eval.png")


def report(results: dict[str, list[dict]], plot_path: Path) -> None:
    print(format_table(results))
    if any(r[0]["kept"] for r in results.values()):
        print("\nDrafts a draft head over the N most frequent tokens (generate.py --draft_vocab N) leaves unchanged: "
              "how often its argmax is the exit's argmax over the whole vocabulary\n")
        print(format_kept_table(results))
    for name, r in results.items():
        print(f"{name}: held-out loss {r[-1]['loss']:.4f}, accuracy {100 * r[-1]['accuracy']:.1f}% at the last layer")
    plot_layers(results, plot_path)
    print(f"plot: {plot_path}")


def eval_only(args) -> None:
    """Per-layer table and plot for one or more checkpoints on the same held-out data."""
    results = {}
    _, val_texts = load_data(args.data, args.glob, args.val_fraction)
    for path in args.checkpoint_path:
        path = Path(path)
        # as generate.py runs it: float32 activations, bfloat16 for a quantized file on a CPU
        model = load_model(path, args.device, None if args.device == "cpu" else torch.float32)
        tokenizer = load_tokenizer(path.parent)  # each model with its own tokenizer
        model.setup_rope(min(args.seq_len, model.args.max_seq_length))
        windows = eval_windows(encode(tokenizer, val_texts), min(args.seq_len, model.args.max_seq_length), args.eval_tokens)
        vocab = model.args.vocab_size
        draft_vocabs = {n: draft_vocab_ids(tokenizer, n, vocab) for n in (vocab // 8, vocab // 4, vocab // 2) if n}
        name = path.parent.name if path.name == "model.pth" else f"{path.parent.name}/{path.stem}"  # DIR/model_int8
        results[name if name not in results else str(path)] = evaluate_layers(model, windows, device=args.device,
                                                                              draft_vocabs=draft_vocabs)
    first = Path(args.checkpoint_path[0])
    report(results, Path(args.plot) if args.plot else first.parent / "layer_eval.png")


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a LayerSkip model (layer dropout + early-exit loss), or evaluate one per layer.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = fail  # one line, not usage + message
    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, nargs="+", default=None, help="text files or folders (default: this Python's standard library source)")
    data.add_argument("--glob", default="*.py", help="which files to read inside folders")
    data.add_argument("--val_fraction", type=float, default=0.05, help="share of documents held out (by content hash)")
    data.add_argument("--vocab_size", type=int, default=2048, help="size of a newly trained tokenizer")
    data.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.model instead of training one")
    m = p.add_argument_group("model (from scratch)")
    m.add_argument("--dim", type=int, default=256, help="model width")
    m.add_argument("--n_layer", type=int, default=8, help="layers (exit points)")
    m.add_argument("--n_head", type=int, default=8, help="attention heads")
    m.add_argument("--n_kv_head", type=int, default=None, help="default: n_head")
    m.add_argument("--intermediate_size", type=int, default=688, help="SwiGLU hidden size")
    m.add_argument("--seq_len", type=int, default=256, help="training window; also the context of a new model")
    m.add_argument("--init_checkpoint", type=Path, default=None, help="continue from this model.pth (continual pretraining / fine-tuning)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps of the whole run")
    o.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    o.add_argument("--lr", type=float, default=1.5e-3, help="AdamW peak learning rate")
    o.add_argument("--min_lr_ratio", type=float, default=0.1, help="final learning rate as a share of --lr")
    o.add_argument("--warmup", type=int, default=50, help="linear warmup steps, then cosine")
    o.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    o.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clipping")
    o.add_argument("--seed", type=int, default=1337, help="initialisation, batches and dropout")
    r = p.add_argument_group("LayerSkip")
    r.add_argument("--p_max", type=float, default=0.1, help="layer dropout rate of the last layer (0: off)")
    r.add_argument("--dropout_depth", choices=["exp", "linear"], default="exp", help="D(l)")
    r.add_argument("--dropout_time", choices=["exp", "constant"], default=None, help="S(t); default exp from scratch, constant from a checkpoint")
    r.add_argument("--curriculum", choices=["none", "rotational", "gradual"], default="rotational",
                   help="which early exits are on: none = all of them at every step")
    r.add_argument("--rotation", type=int, default=2, help="rotational: an exit every R layers")
    r.add_argument("--gradual_fraction", type=float, default=0.5, help="gradual: share of training by which every exit is on")
    r.add_argument("--e_scale", type=float, default=1.0, help="scale of the early layers' exit losses (0: last layer only)")
    r.add_argument("--loss_scale", choices=["sum_l", "l", "one"], default="sum_l", help="weight of exit layer n: n(n+1)/2, n or 1")
    run = p.add_argument_group("run")
    run.add_argument("--out_dir", type=Path, default=Path("out"), help="model.pth, model_config.json, tokenizer.model, train_state.pt")
    run.add_argument("--resume", action="store_true", help=f"continue from OUT_DIR/{STATE_FILE}: the same command plus --resume")
    run.add_argument("--stop_at", type=int, default=None, help="end this run after this step (to continue later with --resume)")
    run.add_argument("--save_interval", type=int, default=100, help="steps between checkpoints")
    run.add_argument("--eval_interval", type=int, default=250, help="steps between held-out evaluations")
    run.add_argument("--eval_tokens", type=int, default=65536, help="held-out tokens per evaluation")
    run.add_argument("--save_dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of model.pth")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    run.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    run.add_argument("--plot", type=Path, default=None, help="per-layer PNG (default: layer_eval.png beside the model)")
    ev = p.add_argument_group("evaluation only")
    ev.add_argument("--eval_only", action="store_true", help="print the per-layer table and plot of --checkpoint_path, train nothing")
    ev.add_argument("--checkpoint_path", type=Path, nargs="+", default=None, help="model.pth file(s) to evaluate and compare")
    args = p.parse_args(argv)

    if args.data is None:
        args.data = default_data()
    if args.dropout_time is None:
        args.dropout_time = "constant" if args.init_checkpoint else "exp"
    checks = [
        (args.eval_only and not args.checkpoint_path, "--eval_only needs --checkpoint_path"),
        (args.steps < 1, "--steps must be at least 1"),
        (args.batch_size < 1, "--batch_size must be at least 1"),
        (args.seq_len < 2, "--seq_len must be at least 2"),
        (not 0 < args.val_fraction < 1, "--val_fraction must be between 0 and 1"),
        (args.vocab_size < 260, "--vocab_size must be at least 260 (256 bytes + unk, bos, eos + 1)"),
        (args.dim < 1 or args.n_head < 1 or args.dim % args.n_head, "--dim must be a positive multiple of --n_head"),
        (args.n_kv_head is not None and (args.n_kv_head < 1 or args.n_head % args.n_kv_head), "--n_head must be a multiple of --n_kv_head"),
        ((args.dim // max(args.n_head, 1)) % 2, "--dim / --n_head (the head size) must be even for RoPE"),
        (args.n_layer < 1 or args.intermediate_size < 1, "--n_layer and --intermediate_size must be positive"),
        (args.lr <= 0 or not 0 <= args.min_lr_ratio <= 1, "--lr must be positive and --min_lr_ratio in [0, 1]"),
        (args.warmup < 0 or args.weight_decay < 0 or args.grad_clip <= 0, "--warmup and --weight_decay must be >= 0, --grad_clip > 0"),
        (not 0 <= args.p_max < 1, "--p_max must be in [0, 1)"),
        (args.rotation < 1, "--rotation must be at least 1"),
        (not 0 < args.gradual_fraction <= 1, "--gradual_fraction must be in (0, 1]"),
        (args.e_scale < 0, "--e_scale must be >= 0"),
        (args.stop_at is not None and args.stop_at < 1, "--stop_at must be at least 1"),
        (args.save_interval < 1 or args.eval_interval < 1 or args.eval_tokens < 1, "--save_interval, --eval_interval and --eval_tokens must be positive"),
        (args.threads is not None and args.threads < 1, "--threads must be at least 1"),
        (args.device != "cpu" and not args.device.startswith("cuda"), f"--device {args.device}: use cpu, cuda or cuda:N"),
        (args.device.startswith("cuda") and not torch.cuda.is_available(), f"--device {args.device}: CUDA is not available"),
    ]
    for bad, message in checks:
        if bad:
            fail(message)
    for path in args.data:
        if not path.exists():
            fail(f"data path not found: {path}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        eval_only(args) if args.eval_only else train(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
