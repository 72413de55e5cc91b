"""The Llama-family transformer, written for fast batch-1 decoding and for LayerSkip.

Besides the usual full forward, the model splits at an exit layer E into two partial passes:
`early` (layers [0, E), which also records the hidden state at E in the exit cache) and `late`
(layers [E, L)). Self-speculative decoding drafts with `head(early(...))` and verifies with
`head(late(exit_cache[...]))`, so every KV entry and every early hidden state is computed once.
Drafts may use a smaller head instead (`set_draft_vocab`): the LM head's rows of the tokens kept,
made once, so that a draft reads a fraction of the head; verification keeps the full head.

Linear layers can also be weight-only quantized (quantize.py writes such files): int8 with one
scale per output channel, or int4 in groups of input columns. The file holds plain codes; they
are packed for this device's kernel when the model is loaded. On a CPU every linear layer runs
the engine's own kernels (cpu_kernels.py), which read a weight once whatever the number of rows.
"""
import ctypes
import json
import math
import mmap
from dataclasses import asdict, dataclass, fields
from functools import partial
from importlib.util import find_spec
from itertools import chain
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import cpu_kernels


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama 3.x: {"rope_type": "llama3", "factor": ..., ...}
    max_seq_length: int = 4096  # the model's context (max_position_embeddings)
    tie_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """Reads a Hugging Face Llama `config.json`; any size, no table of known models."""
        n_head = config["num_attention_heads"]
        # Older configs (the released checkpoints) say rope_theta + rope_scaling; transformers 5
        # writes both into rope_parameters.
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("llama3", "default"):
            raise ValueError(f"rope type {kind!r} is not supported (only default and llama3)")
        scaling = None
        if kind == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            scaling = {key: rope[key] for key in keys}
        return cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layer=config["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=config.get("num_key_value_heads") or n_head,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
            intermediate_size=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_base=rope_base,
            rope_scaling=scaling,
            max_seq_length=config.get("max_position_embeddings", 2048),
            tie_embeddings=config.get("tie_word_embeddings", False),
        )

    @classmethod
    def load(cls, path: Path) -> "ModelArgs":
        """Reads the engine's own `model_config.json`; unknown or missing keys are an error."""
        try:
            config = json.loads(Path(path).read_text())
            return cls(**{f.name: config[f.name] for f in fields(cls)})
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read model config {path}: {e}") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


class KVCache(nn.Module):
    """Static cache for one layer, allocated once; written in place at each row's own positions."""

    def __init__(self, batch: int, length: int, n_kv_head: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        shape = (batch, n_kv_head, length, head_dim)  # made on its device: no copy of it on the CPU first
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("every_row", torch.arange(batch, device=device)[:, None], persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, rows: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """k, v (b, heads, T, head_dim) at input_pos (b, T) of cache rows `rows` (b,); None is every
        row in order (a decode step). Returns the keys and values those rows attend to."""
        index = self.every_row if rows is None else rows[:, None]
        self.k[index, :, input_pos] = k.transpose(1, 2)
        self.v[index, :, input_pos] = v.transpose(1, 2)
        if rows is None:
            return self.k, self.v
        return self.k[rows], self.v[rows]  # a prefill of some rows: a copy of those rows only


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.exit_layer = args.n_layer  # E; layers [0, E) are "early", [E, L) "late"
        # Buffers, not plain attributes, so a CUDA graph treats them as static memory.
        self.register_buffer("exit_cache", None, persistent=False)
        self.register_buffer("rope", None, persistent=False)
        self.register_buffer("every_row", None, persistent=False)  # (B, 1): each cache row, in order
        self.register_buffer("draft_ids", None, persistent=False)  # the draft head's token ids, or None: all
        self.draft_output: Optional[nn.Module] = None  # the LM head's rows of draft_ids
        self.cache_length = 0

    def set_draft_vocab(self, ids: Optional[Tensor]) -> None:
        """Drafts over these token ids only (None: the whole vocabulary), through a head made here
        once of the LM head's rows for them - a copy, so that a draft reads N contiguous rows.
        A quantized head gives its kept codes and scales; it must not be packed yet
        (load_model's draft_ids)."""
        if ids is None:
            self.draft_ids, self.draft_output = None, None
            return
        ids = ids.to(torch.long)
        if ids.dim() != 1 or not 1 <= len(ids) <= self.args.vocab_size or len(ids.unique()) != len(ids):
            raise ValueError(f"draft vocabulary: between 1 and {self.args.vocab_size} distinct token ids needed")
        if int(ids.min()) < 0 or int(ids.max()) >= self.args.vocab_size:
            raise ValueError(f"draft vocabulary: token ids must lie in [0, {self.args.vocab_size})")
        self.draft_ids = ids.to(self.tok_embeddings.weight.device)
        self.draft_output = kept_rows(self.output, self.draft_ids)

    def setup_rope(self, length: int) -> None:
        device = self.tok_embeddings.weight.device
        self.rope = precompute_rope(length, self.args, device)

    def setup_caches(self, batch: int, length: int, exit_layer: Optional[int] = None) -> None:
        """Allocates every layer's KV cache (and, with an exit layer, the exit cache) once.

        `length` may exceed the model's context by the slack self-speculation needs: positions
        past the context are written by rejected drafts only, never emitted.
        """
        weight = self.tok_embeddings.weight  # its dtype and device are the activations'
        self.cache_length = length
        self.exit_layer = self.args.n_layer if exit_layer is None else exit_layer
        for layer in self.layers:  # a tensor-parallel rank's layers have only its share of the heads
            layer.attention.kv_cache = KVCache(
                batch, length, layer.attention.n_kv_head, layer.attention.head_dim, weight.dtype, weight.device)
        self.exit_cache = torch.zeros(batch, length, self.args.dim, dtype=weight.dtype, device=weight.device)
        self.every_row = torch.arange(batch, device=weight.device)[:, None]
        self.setup_rope(length)
        caches = [layer.attention.kv_cache for layer in self.layers]
        self.row_views = {batch: [(self, "exit_cache", self.exit_cache), (self, "every_row", self.every_row)] + [
            (cache, name, getattr(cache, name)) for cache in caches for name in ("k", "v", "every_row")]}
        self.batch = batch

    def use_rows(self, n: int) -> None:
        """Decode steps (rows None) run on the first n rows of the caches from now on: views of
        them, no copy, so a step of a batch whose other rows are idle costs n rows. Prefills name
        their rows and need every row: use_rows(the full batch) first."""
        if n not in self.row_views:
            self.row_views[n] = [(module, name, tensor[:n]) for module, name, tensor in self.row_views[self.batch]]
        for module, name, tensor in self.row_views[n]:
            setattr(module, name, tensor)

    def _mask(self, input_pos: Tensor) -> Tensor:
        # A query at position p sees cache entries 0..p of its own row only: entries past it are
        # stale drafts, padding or another prompt's leftovers. (b, 1, T, cache_length)
        key_pos = torch.arange(self.cache_length, device=input_pos.device)
        return (key_pos <= input_pos[..., None])[:, None]

    def run_layers(self, x: Tensor, input_pos: Tensor, start: int, end: int, rows: Optional[Tensor]) -> Tensor:
        mask = self._mask(input_pos)
        rope = self.rope[input_pos]
        for layer in self.layers[start:end]:
            x = layer(x, rope, input_pos, mask, rows)
        return x

    def early(self, idx: Tensor, input_pos: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """Layers [0, E) on tokens idx (b, T) at input_pos (b, T), one row of the caches per row of
        idx (`rows`, or every row in order); keeps their hidden state at E in the exit cache."""
        h = self.run_layers(self.tok_embeddings(idx), input_pos, 0, self.exit_layer, rows)
        self.exit_cache[self.every_row if rows is None else rows[:, None], input_pos] = h
        return h

    def late(self, h: Tensor, input_pos: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """Layers [E, L) on exit-layer hidden states at input_pos (b, T)."""
        return self.run_layers(h, input_pos, self.exit_layer, self.args.n_layer, rows)

    def head(self, h: Tensor) -> Tensor:
        """The one shared final norm + LM head, used by every exit."""
        return self.output(self.norm(h))

    def draft_head(self, h: Tensor) -> Tensor:
        """The shared norm + the draft head: logits over draft_ids, in their order (the full head
        without a draft vocabulary)."""
        return (self.output if self.draft_output is None else self.draft_output)(self.norm(h))

    def forward(self, idx: Tensor, input_pos: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        return self.head(self.late(self.early(idx, input_pos, rows), input_pos, rows))


class Linear(nn.Linear):
    """nn.Linear, but on a CPU, where no gradient is wanted, the engine's own kernel: it reads the
    weight once for any number of rows (MKL's product reads it again and again past one row).
    One row of float32 under torch.compile through a small weight (at most FUSED_ONE_ROW_MAX
    elements, the demo's every layer) is written as a reduction instead, which inductor fuses into
    the step: there it beats a call to any kernel; from 4 MB on, read from memory, the kernel is
    faster (0.64-0.89 of the reduction's time on a 2-core Xeon; BENCHMARKS.md section 15). Not in a
    quantized model (fused_one_row False, set by quantized_layers): there a float layer's output
    meets layers that round their input to 8 bits, which turn the reduction's last-bit difference
    from the kernel's k + 1-row product into another token (the demo's int4 file did, 1 prompt of
    5); the kernel gives a row the same bits at any row count."""

    fused_one_row = True
    FUSED_ONE_ROW_MAX = 2**20

    def forward(self, x: Tensor) -> Tensor:
        one_row = x.numel() == x.shape[-1]
        if (one_row and self.fused_one_row and torch.compiler.is_compiling() and x.device.type == "cpu"
                and self.weight.dtype == torch.float32 and self.weight.numel() <= self.FUSED_ONE_ROW_MAX):
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        inference = not (torch.is_grad_enabled() and self.weight.requires_grad)
        if (x.device.type == "cpu" and self.weight.dtype in (torch.float32, torch.bfloat16) and inference
                and cpu_kernels.ready()):
            y = cpu_kernels.linear(x, self.weight)
            return y if self.bias is None else y + self.bias
        return super().forward(x)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, input_pos: Optional[Tensor], mask: Optional[Tensor],
                rows: Optional[Tensor] = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, input_pos, mask, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        # q, k and v in one matrix: one weight read per token instead of three.
        self.wqkv = Linear(args.dim, (args.n_head + 2 * args.n_kv_head) * args.head_dim, bias=False)
        self.wo = Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, rope: Tensor, input_pos: Optional[Tensor], mask: Optional[Tensor],
                rows: Optional[Tensor] = None) -> Tensor:
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(bsz, seqlen, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(bsz, seqlen, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, rows)
            if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and cpu_kernels.ready():
                y = cpu_kernels.attention(q, k, v, input_pos)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:  # training: the whole sequence at once, plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 like the reference implementation, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# --- weight-only quantized linear layers ----------------------------------------------------------

QUANTIZATION_VERSION = 1  # of the quantized file format; load_model refuses any other


class Int8Linear(nn.Module):
    """A linear layer stored as int8 codes with one scale per output channel: W = codes * scales.
    pack() lays the codes out for the engine's CPU kernel; its CUDA kernel and PyTorch's CPU kernels
    take them as they are."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))  # cast with the model to the activation dtype

    own_kernel = False  # packed for cpu_kernels

    def pack(self, done: Optional[Callable[[Tensor], None]] = None) -> None:
        """Once, after the model is on its device: on a CPU with the engine's kernels, the codes in
        their layout (cpu_kernels.pack_int8, which calls done(rows) as it goes); elsewhere as they are."""
        if self.codes.device.type == "cpu" and cpu_kernels.ready():
            self.register_buffer("packed", cpu_kernels.pack_int8(self.codes, done))
            del self.codes
            self.own_kernel = True

    def forward(self, x: Tensor) -> Tensor:
        if self.own_kernel:
            return cpu_kernels.linear(x, self.packed, self.scales.float())
        if x.device.type == "cpu" and self.in_features % 16 == 0:
            # The CPU kernel reads the int8 weight once (no float copy of it). It needs rows of a
            # multiple of 16 (it crashes on others) and, in bfloat16, 32-byte aligned input rows,
            # which a fresh copy has and a view into a larger buffer may not.
            rows = x.reshape(-1, self.in_features).clone()
            out = torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.scales)
            return out.view(*x.shape[:-1], self.out_features)
        # On CUDA the engine's kernel, but not in an eager prompt pass (cpu_kernels.prompt_pass): the
        # kernel's time grows with the rows (on an H200, 7 rows of 128256 x 2048 codes took 5.3x one
        # row's), cuBLAS's product of the cast weight's did not (1 and 7 rows alike), and a prompt is
        # the same pass in either decoding, so its rows need not have a step's bits.
        if x.device.type == "cuda" and not cpu_kernels.eager_prompt():
            import cuda_kernels  # Triton's, loaded on first use: CPU-only installs have no Triton
            return cuda_kernels.int8_linear(x, self.codes, self.scales)
        return F.linear(x, self.codes.to(x.dtype)) * self.scales


class Int4Linear(nn.Module):
    """A linear layer stored as 4-bit codes q in groups of `groupsize` input columns, each group of
    each row with its own scale and zero: W = (q - 8) * scale + zero. The file holds plain nibbles,
    two per byte (the even column in the high one); pack() turns them into this device's layout."""

    def __init__(self, in_features: int, out_features: int, groupsize: int):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.register_buffer("codes", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // groupsize, out_features, 2))

    own_kernel = False  # packed for cpu_kernels

    def pack(self, done: Optional[Callable[[Tensor], None]] = None) -> None:
        """Once, after the model is on its device and in its dtype: the kernels' own weight layout.
        The engine's CPU kernel takes codes and scales in one stream (cpu_kernels.pack_int4, float16
        scales; it calls done(rows) as it goes). PyTorch's kernels want their packing, with the rows
        padded to a multiple of 16 on CPU, 8 on CUDA."""
        codes, on_cpu = self.codes, self.codes.device.type == "cpu"
        if on_cpu and cpu_kernels.ready():
            packed = cpu_kernels.pack_int4(codes, self.scales_and_zeros, self.groupsize, done)
            self.register_buffer("packed", packed)
            del self.codes, self.scales_and_zeros
            self.own_kernel = True
            return
        pad = -self.out_features % (16 if on_cpu else 8)
        codes = F.pad(codes, (0, 0, 0, pad))
        self.scales_and_zeros = F.pad(self.scales_and_zeros, (0, 0, 0, pad)).contiguous()  # zero rows: W = 0
        if on_cpu:
            nibbles = torch.stack([codes >> 4, codes & 15], dim=-1).view(codes.shape[0], -1)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles.to(torch.int32), 8)
        else:
            inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(codes.contiguous(), inner_k_tiles)
        del self.codes
        self.register_buffer("packed", packed)

    def forward(self, x: Tensor) -> Tensor:
        if self.own_kernel:
            return cpu_kernels.linear(x, self.packed, None, self.groupsize)
        rows = x.reshape(-1, self.in_features).contiguous()
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if x.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
        out = mm(rows, self.packed, self.groupsize, self.scales_and_zeros)
        return out[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)


def kept_rows(layer: nn.Module, ids: Tensor) -> nn.Module:
    """A linear layer of the same kind holding copies of `layer`'s output rows `ids`."""
    if isinstance(layer, (Int4Linear, Int8Linear)) and not hasattr(layer, "codes"):
        raise ValueError("the quantized head is packed already: give the draft vocabulary to load_model")
    if isinstance(layer, Int8Linear):
        rows = {"codes": layer.codes[ids], "scales": layer.scales[ids]}
        make = partial(Int8Linear, layer.in_features, len(ids))
    elif isinstance(layer, Int4Linear):
        rows = {"codes": layer.codes[ids], "scales_and_zeros": layer.scales_and_zeros[:, ids].contiguous()}
        make = partial(Int4Linear, layer.in_features, len(ids), layer.groupsize)
    else:
        rows = {"weight": nn.Parameter(layer.weight.detach()[ids], requires_grad=False),
                "fused_one_row": layer.fused_one_row}
        make = partial(Linear, layer.in_features, len(ids), bias=False)
    with torch.device("meta"):  # no memory for the constructor's weights: they are replaced
        kept = make()
    for name, tensor in rows.items():
        setattr(kept, name, tensor)
    return kept


def quantized_layers(model: nn.Module, state: dict, quantization: dict) -> None:
    """Replaces each linear layer whose weight `state` holds as codes by its quantized kind; the
    layers left in float run one row through the kernel too (Linear.fused_one_row)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear):
            module.fused_one_row = False
        if isinstance(module, nn.Linear) and f"{name}.codes" in state:
            parent, _, child = name.rpartition(".")
            layer = (Int8Linear(module.in_features, module.out_features) if quantization["mode"] == "int8"
                     else Int4Linear(module.in_features, module.out_features, quantization["groupsize"]))
            setattr(model.get_submodule(parent), child, layer)


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies, with Llama 3.x's rescaling of the long wavelengths when configured."""
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    smooth = (old_context / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    in_band = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(in_band, mid, scaled)


def precompute_rope(length: int, args: ModelArgs, device: torch.device) -> Tensor:
    """cos and sin for every position, shape (length, 2, head_dim), float32."""
    inv_freq = rope_frequencies(args).to(device)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """x (b, heads, T, head_dim); rope (b, T, 2, head_dim) per row, or (T, 2, head_dim) for all rows."""
    # Hugging Face's half-split layout ("rotate_half"), so converted weights need no permutation.
    cos, sin = rope[..., 0, :].unsqueeze(-3).to(x.dtype), rope[..., 1, :].unsqueeze(-3).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def storages_by_address(state: dict) -> dict:
    """The storages under a loaded checkpoint's tensors, by address: the file_storages that
    file_pages looks a tensor's storage up in."""
    storages = (tensor.untyped_storage() for tensor in state.values() if isinstance(tensor, Tensor))
    return {storage.data_ptr(): storage for storage in storages if storage.nbytes()}


def file_pages(tensor: Tensor, file_storages: dict) -> range:
    """The whole pages under a contiguous `tensor` when it lies in one of the memory-mapped
    checkpoint's storages (file_storages, by address); none for any other memory (a copy out of
    the file, a GPU's), which release_pages must never touch."""
    storage = tensor.untyped_storage()
    if tensor.device.type != "cpu" or storage.data_ptr() not in file_storages or not tensor.is_contiguous():
        return range(0)
    start = tensor.data_ptr()
    end = start + tensor.nbytes
    return range(-(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE)


def release_pages(pages: range) -> None:
    """Hands back pages of the mapped checkpoint (file_pages) once what they hold has been copied
    (converted, packed). The mapping lives as long as any tensor in it (the embedding, read in
    place), and each page read once stays resident with it: an int4 file's codes and float32
    scales (0.38 GB of the 0.9 GB 1B-shaped file) would sit beside their packed copies. The pages
    are the file's, unwritten: a later read takes them from the file again."""
    if len(pages) > 0 and hasattr(mmap, "MADV_DONTNEED"):
        ctypes.CDLL(None).madvise(ctypes.c_void_p(pages.start), ctypes.c_size_t(len(pages)), mmap.MADV_DONTNEED)


CONVERT_BYTES = 2**26  # of a tensor's file converted at a time (convert_in_place)


def convert_in_place(model: nn.Module, dtype: torch.dtype, file_storages: dict) -> None:
    """The model's floating-point tensors in `dtype`, one at a time and each in runs of
    CONVERT_BYTES, every run's file pages handed back as soon as it is converted: model.to()
    converts every tensor before any page could be, and a float file made float32 would keep the
    whole file resident beside the copies until the load ends; a float32 embedding converted whole
    (Llama 3's 128256 rows: 1.05 GB) would sit resident beside its copy."""
    for tensor in chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point() and tensor.dtype != dtype:
            source = tensor.data.reshape(-1)
            converted = torch.empty(tensor.shape, dtype=dtype)
            run = CONVERT_BYTES // source.element_size()
            for start in range(0, source.numel(), run):
                converted.view(-1)[start:start + run] = source[start:start + run]
                release_pages(file_pages(source[start:start + run], file_storages))
            release_pages(file_pages(source, file_storages))  # the pages that straddle two runs
            tensor.data = converted


def load_model(checkpoint_path: Path, device: str = "cpu", dtype: Optional[torch.dtype] = torch.float32,
               shard: Optional[Callable[[Transformer, dict, Optional[dict]], dict]] = None,
               draft_ids: Optional[Tensor] = None) -> Transformer:
    """Builds the model on the meta device and assigns the memory-mapped weights to it.

    `model_config.json` sits beside the checkpoint, which may be quantized (quantize.py): its
    layers are then packed for `device`, with `dtype` as the activations' dtype. dtype None is
    bfloat16 on CUDA; on a CPU float32, but bfloat16 for a quantized file, whose CPU kernels are
    several times slower with float32 activations. shard(model, state, quantization), given,
    returns the state of one tensor-parallel rank (tp.py) and fits the meta model's layers to it
    before anything is read. Raises ValueError / FileNotFoundError with a message fit for one
    line on stderr. draft_ids, given, are the draft head's tokens (Transformer.set_draft_vocab),
    its rows taken before any packing.
    """
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
    args = ModelArgs.load(checkpoint_path.parent / "model_config.json")
    with torch.device("meta"):
        model = Transformer(args)
    try:
        state = torch.load(checkpoint_path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # a truncated or foreign file: torch raises many kinds of error
        raise ValueError(f"cannot read checkpoint {checkpoint_path}: {str(e).splitlines()[0]}") from None
    quantization = state.pop("quantization", None)
    # The file's storages by address, held to the end of the load and with them the mapping: a page
    # release_pages hands back must still be the file's, never memory allocated since at an address
    # the mapping gave up.
    file_storages = storages_by_address(state)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") or quantization is not None else torch.float32
    if quantization is not None:
        if not isinstance(quantization, dict) or quantization.get("version") != QUANTIZATION_VERSION:
            found = quantization.get("version") if isinstance(quantization, dict) else quantization
            raise ValueError(f"{checkpoint_path}: quantized file format {found!r} is not the one this engine reads "
                             f"({QUANTIZATION_VERSION}): quantize the checkpoint again")
        if quantization["mode"] == "int4" and device.startswith("cuda") and dtype != torch.bfloat16:
            raise ValueError(f"int4 on CUDA runs with bfloat16 activations only, not {str(dtype).removeprefix('torch.')}")
        if quantization["mode"] == "int8" and device.startswith("cuda") and find_spec("triton") is None:
            raise ValueError("int8 on CUDA runs the engine's Triton kernel, and Triton is not installed "
                             "(PyTorch's CUDA builds for Linux bring it: pip install triton)")
    elif any(name.endswith(".codes") for name in state):
        raise ValueError(f"{checkpoint_path} holds quantized weights but no quantization metadata")
    if shard is not None:
        with torch.device("meta"):
            state = shard(model, state, quantization)
    if quantization is not None:
        with torch.device("meta"):
            quantized_layers(model, state, quantization)
    # A tied head is stored once, as the embedding; a quantized or tensor-parallel head is its own.
    tied = args.tie_embeddings and not any(name.startswith("output.") for name in state)
    if tied and "tok_embeddings.weight" in state:  # tie for a strict load
        state["output.weight"] = state["tok_embeddings.weight"]
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ValueError(f"checkpoint {checkpoint_path} does not match model_config.json: {detail}") from None
    del state  # the model's tensors are its own now: a layer's converted scales go when its packing drops them
    if tied:
        model.output.weight = model.tok_embeddings.weight
    if device == "cpu":
        convert_in_place(model, dtype, file_storages)
    model = model.to(device=device, dtype=dtype).eval()
    model.set_draft_vocab(draft_ids)
    if device == "cpu":
        cpu_kernels.ready()  # built now, not first met inside a compiled step
    # Each layer's file pages handed back once it is packed. In the model's order: packing the LM
    # head first lowered the peak by 0.15 GB, but decoding measured 2-4% slower, the packed layers
    # placed differently in memory.
    for module in model.modules():
        if isinstance(module, (Int4Linear, Int8Linear)):
            read = [file_pages(getattr(module, name), file_storages) for name in ("codes", "scales_and_zeros")
                    if hasattr(module, name)]
            # a large head's codes handed back as they are laid out, not beside the whole packed copy
            module.pack(lambda rows: release_pages(file_pages(rows, file_storages)))
            for pages in read:
                release_pages(pages)
    return model
