"""The engine's own CPU kernels (cpu_kernels.cpp), built at first use.

    python cpu_kernels.py   # GB/s of weight bytes of one 8192 x 2048 layer from memory, these kernels and PyTorch's
    python cpu_kernels.py --prompt --rows 136   # the same as a prompt's pass runs them

torch.ops.layerskip.linear, for float32, bfloat16, int8 (a scale per output channel) and int4 (a
scale and a zero per group) weights and float32 activations: each block of weight rows is read from
memory once and applied to every row of the input, so a pass over k + 1 or B rows costs about what
one row costs until the arithmetic catches up with the memory. bfloat16 layers round their input to
bfloat16 (a bfloat16 model's activations are already) and, on CPUs with AVX-512's bfloat16 dot
products, multiply pairs of columns in one instruction. int8 and int4 layers round their input to
8 bits in blocks of 32 columns (as llama.cpp's Q8_0 does) and multiply with integer dot products, a
quarter of the float arithmetic. Both are packed at load into one stream per tile of 16 channels,
laid out as the dot products take them, a lane per channel: int8 codes (pack_int8; the scales
apart, one per channel), int4 codes with their float16 scales and zeros (pack_int4), 5 bits a
weight at groups of 32, 4.5 for symmetric codes (no zeros).

torch.ops.layerskip.attention, for the decoding steps: each query over the filled part of its row's
cache, in one order whatever queries, rows and cache length come with it. PyTorch's attention
blocks its sums by all three; rounding activations to 8 bits would turn those last-bit differences
into different tokens between a verify pass, a batch and a lone step.

Compiled for AVX-512 (with and without VNNI and bfloat16 dot products) and for AVX2 (with FMA and
F16C) and chosen at run time; on a CPU with AMX's tiles ("amx"), int4 products of 5 rows or more run
on the int8 tiles, giving each row the bits the vector path gives it, and bfloat16 products of any
rows on the bfloat16 tiles, which multiply 16 rows for about what one costs (a prompt's too: on a
2-core Xeon as fast as PyTorch's oneDNN or faster, and a row's bits do not depend on the rows beside
it, as oneDNN's do); on AVX2 alone a prompt's float32, bfloat16 and int8 products (prompt_pass)
take a matrix product's layout, 16 rows against each weight broadcast, at about four fifths of a
core's multiply-add rate. Where they cannot be built (no compiler, no ninja) the model keeps
PyTorch's kernels and one line on stderr says so. They are ops of their own, so a compiled step
stays one graph and reads the one copy of the weights the model holds.
"""
import logging
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

ISAS = {"amx": 4, "avx512_vnni": 3, "avx512": 2, "avx2": 1}
isa: Optional[str] = None  # the kernels in use: one of ISAS, "" (PyTorch's), None (not yet looked at)
supported = ""  # the best this CPU runs, once built
in_prompt = False  # inside prompt_pass


def enable(force: Optional[str] = None) -> str:
    """Builds (once) and loads the kernels; returns the instruction set in use, "" for none.
    force: one of ISAS that this CPU has, "" for PyTorch's kernels (tests)."""
    global isa, supported
    if force is not None and force not in ISAS and force != "":
        raise ValueError(f"unknown instruction set {force!r}")
    if force == "":
        isa = ""
        return isa
    if not hasattr(torch.ops.layerskip, "linear"):
        from torch.utils.cpp_extension import load
        here = Path(__file__).resolve().parent
        quiet = logging.getLogger("torch.utils.cpp_extension")  # its compiler warnings: one line says enough
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = load("layerskip_cpu_kernels", [str(here / "cpu_kernels.cpp")],
                              extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler, no ninja, a failed build: all of them leave PyTorch's kernels
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            detail = next((line for line in lines[1:] if "error" in line.lower() or "not found" in line), lines[-1])
            print(f"cpu kernels not built ({detail}): using PyTorch's", file=sys.stderr)
            isa = ""
            return isa
        finally:
            quiet.setLevel(level)
        torch.library.register_fake("layerskip::linear")(output_shape)
        torch.library.register_fake("layerskip::attention")(lambda q, k, v, input_pos, isa: torch.empty_like(q))
        supported = {level: name for name, level in ISAS.items()}.get(module.supported_isa(), "")
        if not supported:
            print("cpu kernels: this CPU has neither AVX-512 nor AVX2 with FMA and F16C: using PyTorch's", file=sys.stderr)
    if force is not None and ISAS[force] > ISAS.get(supported, 0):
        raise ValueError(f"this CPU cannot run the {force} kernels")
    isa = supported if force is None else force
    return isa


def output_shape(x: Tensor, weight: Tensor, scales: Optional[Tensor], group: int, isa: int, prompt: bool) -> Tensor:
    """What torch.compile traces in place of the op."""
    return x.new_empty(x.shape[0], weight.shape[0])


def ready() -> bool:
    """Whether CPU linear layers run these kernels; the first call outside a compiled region builds them."""
    if isa is None and not torch.compiler.is_compiling():
        enable()
    return bool(isa)


def linear(x: Tensor, weight: Tensor, scales: Optional[Tensor] = None, group: int = 0) -> Tensor:
    """x (..., K) in any float dtype against weight (N, K) float32 / bfloat16, int8 codes packed by
    pack_int8 with scales (N,) float32, or int4 weights packed by pack_int4 (no scales); bfloat16
    meets x rounded to bfloat16, int8 and int4 x rounded to 8 bits per block of 32 columns. Returns
    (..., N) in x's dtype. The sums are float32."""
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    out = torch.ops.layerskip.linear(rows, weight, scales, group, ISAS[isa], eager_prompt())
    return out.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)


@contextmanager
def prompt_pass() -> Iterator[None]:
    """The products inside are a prompt's pass (eager only: a compiled prefill keeps the kernels), where
    CUDA's int8 layers take cuBLAS's product of the cast weight (model.Int8Linear) and, on AVX2, the
    float32, bfloat16 and int8 layers the kernels' prompt product (int8 with x as it is, not rounded
    to 8 bits)."""
    global in_prompt
    before, in_prompt = in_prompt, True
    try:
        yield
    finally:
        in_prompt = before


def eager_prompt() -> bool:
    """Whether a product runs in a prompt's pass, eagerly: a compiled prefill keeps the step's kernels."""
    return in_prompt and not torch.compiler.is_compiling()


TILE, BLOCK, SPAN = 16, 128, 32  # channels and columns of a packed block, columns of a span
                                 # (cpu_kernels.cpp: TILE_CHANNELS, BLOCK, SPAN)
PACK_TILES = 256  # tiles pack_int8 and pack_int4 lay out at a time


def pack_int8(codes: Tensor, done: Optional[Callable[[Tensor], None]] = None) -> Tensor:
    """int8 codes (N, K), as quantize.py writes them, in the kernel's layout: per tile of 16 channels
    and block of 128 columns, the block's 4 spans of 32 columns, each 8 rows of 64 bytes (byte 4c + j
    of row i: channel c's column 4i + j), every code + 128 as an unsigned byte; the columns past K
    and the last tile's missing channels hold code 0. Returns a uint8 (N, K rounded up to whole
    blocks) view of a storage that also holds the last tile's missing channels. done(rows), given,
    hears each run of codes' rows once laid out (load_model hands their pages of the file back)."""
    n, k = codes.shape
    tiles, blocks = -(-n // TILE), -(-k // BLOCK)
    data = torch.empty(tiles, blocks, TILE * BLOCK, dtype=torch.uint8)
    for t0 in range(0, tiles, PACK_TILES):  # a few tiles at a time: small temporaries beside a large head
        t1, c0 = min(tiles, t0 + PACK_TILES), t0 * TILE
        c1 = min(n, t1 * TILE)
        offset = torch.full(((t1 - t0) * TILE, blocks * BLOCK), 128, dtype=torch.uint8)
        offset[:c1 - c0, :k] = codes[c0:c1].view(torch.uint8) ^ 128  # two's complement + 128
        # (tile, channel c, block, span, row i, column j) -> (tile, block, span, i, c, j)
        offset = offset.view(t1 - t0, TILE, blocks, BLOCK // SPAN, 8, 4).permute(0, 2, 3, 4, 1, 5)
        data[t0:t1] = offset.reshape(t1 - t0, blocks, -1)
        if done:
            done(codes[c0:c1])
    return data.view(-1)[:n * blocks * BLOCK].view(n, blocks * BLOCK)


def pack_int4(codes: Tensor, scales_and_zeros: Tensor, group: int,
              done: Optional[Callable[[Tensor], None]] = None) -> Tensor:
    """int4 codes (N, K / 2), two a byte (high nibble first), and scales_and_zeros (K / group, N, 2)
    of (scale, zero) with W = (code - 8) * scale + zero, as quantize.py writes them, in the kernel's
    layout: per tile of 16 channels and block of 128 columns, the codes of the block's 4 spans of 32
    columns (byte 4c + j of a span's row r: channel c's columns 4r + j in the low nibble, 16 + 4r + j
    in the high one), then the tile's scales and shifted zeros (zero - 8 scale) in float16, 16 of each
    for each of the block's max(1, 128 / group) groups, so that a product reads one stream of memory.
    Where every zero is 0 (quantize.py's symmetric codes) the scales alone: 4.5 bits a weight at
    groups of 32, and the kernel knows the layout by its width. Returns a uint8 (N, bytes per channel)
    view of a storage that also holds the last tile's missing channels (zeros). done(rows): as
    pack_int8's."""
    n, half = codes.shape
    tiles, blocks, pairs = -(-n // TILE), -(-2 * half // BLOCK), max(1, BLOCK // group)
    spans, code_bytes = BLOCK // SPAN, TILE * BLOCK // 2  # code_bytes: a tile's, a block
    halves = 1 if bool((scales_and_zeros[..., 1] == 0).all()) else 2  # float16s a channel and group: scale (, zero)
    data = torch.zeros(tiles, blocks, code_bytes + 2 * halves * TILE * pairs, dtype=torch.uint8)
    for t0 in range(0, tiles, PACK_TILES):  # a few tiles at a time: small temporaries beside a large head
        t1, c0 = min(tiles, t0 + PACK_TILES), t0 * TILE
        c1 = min(n, t1 * TILE)
        nibbles = torch.zeros((t1 - t0) * TILE, blocks * BLOCK, dtype=torch.uint8)
        nibbles[:c1 - c0, :2 * half] = torch.stack([codes[c0:c1] >> 4, codes[c0:c1] & 15], dim=-1).view(c1 - c0, -1)
        # (tile, channel c, block, span, half, row r, column j) -> (tile, block, span, r, c, j, half)
        nibbles = nibbles.view(t1 - t0, TILE, blocks, spans, 2, 4, 4).permute(0, 2, 3, 5, 1, 6, 4)
        data[t0:t1, :, :code_bytes] = (nibbles[..., 0] | nibbles[..., 1] << 4).reshape(t1 - t0, blocks, -1)
        scale, zero = scales_and_zeros[:, c0:c1].float().unbind(-1)  # (K / group, channels) each
        table = torch.stack([scale, zero - 8 * scale][:halves]).transpose(1, 2)  # (halves, channels, K / group)
        if group > BLOCK:  # a group spans several blocks: each block holds its group's pair
            table = table.repeat_interleave(group // BLOCK, dim=2)
        half_table = torch.zeros(halves, (t1 - t0) * TILE, blocks * pairs, dtype=torch.float16)
        half_table[:, :c1 - c0, :table.shape[2]] = table.half()  # the columns past K: scale and zero 0
        # (scale or zero, tile, channel, block, pair) -> (tile, block, pair, scale or zero, channel)
        half_table = half_table.view(halves, t1 - t0, TILE, blocks, pairs).permute(1, 3, 4, 0, 2)
        data[t0:t1, :, code_bytes:] = half_table.reshape(t1 - t0, blocks, -1).contiguous().view(torch.uint8)
        if done:
            done(codes[c0:c1])
    per_channel = blocks * (BLOCK // 2 + 2 * halves * pairs)
    return data.view(-1)[:n * per_channel].view(n, per_channel)


def attention(q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
    """q (b, heads, T, head_dim) at input_pos (b, T), each query over its row's cache entries
    0..its position of k, v (b, kv_heads, length, head_dim); float32 or bfloat16. Each query's result
    is the same whatever the queries, rows and cache length beside it."""
    positions = input_pos.expand(q.shape[0], q.shape[2]).contiguous()
    return torch.ops.layerskip.attention(q.contiguous(), k, v, positions, ISAS[isa])


def main() -> None:
    import argparse
    import itertools
    import time
    import torch.nn.functional as F
    from quantize import quantize_int4, quantize_int8
    p = argparse.ArgumentParser(description="GB/s of weight bytes of one layer, these kernels and PyTorch's")
    p.add_argument("--shape", type=int, nargs=2, default=(8192, 2048), metavar=("N", "K"))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 7, 8, 16, 32, 64])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--isa", choices=list(ISAS), help="default: the best this CPU has")
    p.add_argument("--pytorch", action="store_true", help="PyTorch's kernels too")
    p.add_argument("--prompt", action="store_true",
                   help="the products as a prompt's pass runs them (prompt_pass): on AVX2 another layout")
    p.add_argument("--cpu_time", action="store_true",
                   help="time by the thread's CPU time, not the wall clock (one thread only): what a product costs "
                        "the core, whatever else the machine runs")
    args = p.parse_args()
    if args.cpu_time and args.threads != [1]:
        sys.exit("--cpu_time measures one thread: add --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    if not enable(args.isa):
        sys.exit("the kernels are not available")

    def seconds(f, calls: int = 30) -> float:  # median
        for _ in range(3):
            f()
        times = []
        for _ in range(calls):
            start = clock()
            f()
            times.append(clock() - start)
        return sorted(times)[calls // 2]

    N, K = args.shape
    w = torch.randn(N, K) / K ** 0.5
    codes8, scales8 = quantize_int8(w)
    codes4, sz = quantize_int4(w, 32)
    codes4s, sz_s = quantize_int4(w, 32, symmetric=True)
    nibbles = torch.stack([codes4 >> 4, codes4 & 15], dim=-1).view(N, -1).to(torch.int32)
    int4pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    # name -> (a copy of the weights, the product of x with such a copy); bytes: every byte a copy holds
    kernels = {"own float32": (lambda: w.clone(), lambda x, c: linear(x, c)),
               "own bfloat16": (lambda: w.bfloat16(), lambda x, c: linear(x, c)),
               "own int8": (lambda: (pack_int8(codes8), scales8.clone()), lambda x, c: linear(x, *c)),
               "own int4 g32 (float16 scales)": (lambda: pack_int4(codes4, sz, 32), lambda x, c: linear(x, c, None, 32)),
               "own int4 g32 symmetric": (lambda: pack_int4(codes4s, sz_s, 32), lambda x, c: linear(x, c, None, 32))}
    if args.pytorch:
        kernels |= {
            "F.linear float32": (lambda: w.clone(), lambda x, c: F.linear(x, c)),
            "F.linear bfloat16": (lambda: w.bfloat16(), lambda x, c: F.linear(x.bfloat16(), c)),
            "_weight_int8pack_mm (bf16 x)": (lambda: (codes8.clone(), scales8.bfloat16()),
                                             lambda x, c: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), *c)),
            "_weight_int4pack_mm_for_cpu g32 (bf16 x, bf16 scales)": (
                lambda: (int4pack(nibbles, 8), sz.bfloat16()),
                lambda x, c: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), c[0], 32, c[1]))}

    def nbytes(copy) -> int:
        return sum(t.nbytes for t in (copy if isinstance(copy, tuple) else (copy,)))

    big, target = torch.ones(2**26), torch.zeros(2**26)
    print(f"{N} x {K}, isa {isa}, torch {torch.__version__}; GB/s of weight bytes (scales included), median of "
          f"30 calls ({'thread CPU time' if args.cpu_time else 'wall clock'}), each call on the next of copies of "
          f"the weights that fill 256 MB together: read from memory, not from the cache")
    for threads in args.threads:
        torch.set_num_threads(threads)
        copy = 2 * big.nbytes / seconds(lambda: target.copy_(big), 10) / 1e9
        print(f"\n{threads} thread(s); a 256 MB copy: {copy:.1f} GB/s (read + write)")
        print("| kernel | " + " | ".join(f"M={m}" for m in args.rows) + " |")
        for name, (make, product) in kernels.items():
            first = make()
            copies = itertools.cycle([first] + [make() for _ in range(2 ** 28 // nbytes(first))])
            row = []
            for M in args.rows:
                x = torch.randn(M, K)
                with prompt_pass() if args.prompt else nullcontext():
                    row.append(nbytes(first) / seconds(lambda: product(x, next(copies))))
            del copies
            print(f"| {name} | " + " | ".join(f"{b / 1e9:.3g}" for b in row) + " |")


if __name__ == "__main__":
    main()
