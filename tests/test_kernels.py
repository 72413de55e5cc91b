"""The engine's CPU linear kernels (cpu_kernels.py): each kind of weight on each instruction set
against a float64 product of the same weights, a row's result independent of the rows beside it,
the layers running them (and PyTorch's kernels where they cannot be built), and exact greedy
self-speculation through them on quantized files, batched."""
import contextlib
import itertools
import os
import subprocess
import sys

import pytest
import torch

import cpu_kernels
import quantize
from conftest import ROOT
from model import Int4Linear, Int8Linear, Linear, ModelArgs, Transformer, kept_rows, load_model, quantized_layers
from test_batch import batch_one, run_batch
from test_quantize import quantized  # noqa: F401 (a fixture)

if not cpu_kernels.ready():
    pytest.skip("the engine's CPU kernels are not built here", allow_module_level=True)

ISAS = [isa for isa in cpu_kernels.ISAS if cpu_kernels.ISAS[isa] <= cpu_kernels.ISAS[cpu_kernels.enable()]]
cpu_kernels.enable()


@pytest.fixture(params=list(cpu_kernels.ISAS))
def isa(request, monkeypatch):
    """Each instruction set's kernels, where this CPU has it (an AVX2-only CPU skips AVX-512). The
    VNNI build differs from AVX-512's in int8 and int4, and in bfloat16 where the CPU has AVX-512's
    bfloat16 dot products; AMX's from the VNNI build's in int4 from 5 rows and in bfloat16 at any
    rows, where the CPU has its bfloat16 tiles."""
    if request.param not in ISAS:
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setattr(cpu_kernels, "isa", request.param)
    return request.param


def kernel_weights(kind: str, rows: int, columns: int) -> tuple[torch.Tensor, tuple, torch.Tensor]:
    """A random weight of this kind: (the weight it stands for in float64, the kernel's arguments,
    for int8 and int4 the shifted zero of each column, 0 for int8)."""
    w = torch.randn(rows, columns) / columns ** 0.5
    if kind == "float32":
        return w.double(), (w, None, 0), None
    if kind == "bfloat16":
        return w.bfloat16().double(), (w.bfloat16(), None, 0), None
    if kind == "int8":
        codes, scales = quantize.quantize_int8(w)
        return (quantize.dequantize_int8(codes, scales).double(), (cpu_kernels.pack_int8(codes), scales, 0),
                torch.zeros(rows, columns).double())
    group, symmetric = int(kind.removeprefix("int4 g").removesuffix(" symmetric")), kind.endswith("symmetric")
    codes, sz = quantize.quantize_int4(w, group, symmetric)
    scale, zero = sz.unbind(-1)  # what pack_int4 keeps: scale and zero - 8 scale, in float16
    scale, shifted = (t.t().half().double().repeat_interleave(group, dim=1) for t in (scale, zero - 8 * scale))
    nibbles = torch.stack([codes >> 4, codes & 15], dim=-1).view(rows, columns).double()
    packed = (cpu_kernels.pack_int4(codes, sz, group), None, group)
    if symmetric:  # the kernel takes 8 scales off with x rounded, as it takes the codes
        return (nibbles - 8) * scale, packed, torch.zeros(rows, columns).double()
    return nibbles * scale + shifted, packed, shifted


KINDS = ["float32", "bfloat16", "int8"] + [f"int4 g{g}{s}" for g in quantize.GROUP_SIZES for s in ("", " symmetric")]
ROWS = (1, 2, 3, 7, 8, 9, 33, 64, 70)  # past 64: a prompt's blocks of columns


def rounded_reference(x: torch.Tensor, w: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """What the int8 and int4 kernels compute, in float64: x rounded as the kernels round it (blocks
    of 32 columns, the last one padded with zeros, d = max |x| / 127, q = round(x * (127 / max |x|)),
    in float32) against code * scale, and x as it is against the shifted zero."""
    blocks = torch.nn.functional.pad(x, (0, -x.shape[1] % 32)).view(x.shape[0], -1, 32)
    most = blocks.abs().amax(-1, keepdim=True)
    # the kernels' quotient 127 / max |x|; PyTorch's `127 / most` is most's reciprocal times 127, a
    # last bit off now and then, which moved a code at a tie
    q = torch.round(blocks * torch.where(most > 0, torch.full_like(most, 127) / most, 0))
    rounded = (q * (most / 127)).flatten(1)[:, :x.shape[1]].double()
    return rounded @ (w - zero).t() + x.double() @ zero.t()


@pytest.mark.parametrize("kind", KINDS)
def test_each_kernel_equals_a_float64_product_of_its_weights(isa, kind):
    """Output channels a multiple of the tiles (64: 4 channels, 16 for int8 and int4) and not (37);
    input columns a multiple of the vector (512) and, but for int4 (whole groups), not (100: a scalar
    tail for the float kinds, a span of 32 only partly in K for int8); for int8 and int4, columns
    that end in part of a block of 128 (352: 3 of its 4 spans of 32; 320: 2, for groups of 64);
    every row count of ROWS, which are and are not multiples of the row tiles (4 rows on AVX-512, 3
    on AVX2; AMX's tiles of 8 and 16 rows, from 5 rows), each once as a step's rows and once as a
    prompt's (prompt_pass: on AVX2 the float kinds take panels of 16 rows, the last one of 8 or
    fewer in one vector, by tiles of 6 channels, in blocks of 96 channels and 256 columns; 197 x 300
    gives them three blocks of channels, the last partial, and two of columns; int8 takes them too,
    with x as it is, 8 bits only in its steps).
    bfloat16 is held to the product of x rounded to bfloat16, int8 and int4 to that of x rounded to
    8 bits as the kernels round it (rounded_reference), int4 with the float16 scales and zeros it is
    packed with.
    Columns past one block of the float kinds (1100: bfloat16 takes 512 a block, float32 256, and
    1024 / 2048 past 64 rows), whose sums carry from block to block.
    Tolerance: 1e-5 of sum |x| |w| per output (float32 accumulation over at most 1100 products
    rounds to ~1e-6 of it; a wrong or missing term is of the order of the output itself)."""
    torch.manual_seed(0)
    shapes = [(64, 512), (37, 512), (37, 100), (37, 352), (37, 320), (37, 1100)]
    for out_features, in_features in shapes + ([(197, 300)] if kind in ("float32", "bfloat16", "int8") else []):
        if kind.startswith("int4") and in_features % int(kind.split()[1].removeprefix("g")):
            continue
        w, args, zero = kernel_weights(kind, out_features, in_features)
        for rows, prompt in itertools.product(ROWS, (False, True)):
            x = torch.randn(rows, in_features)
            with cpu_kernels.prompt_pass() if prompt else contextlib.nullcontext():
                got = cpu_kernels.linear(x, *args)
            as_it_is = prompt and isa == "avx2" and kind == "int8"  # AVX2's prompt product takes x unrounded
            expected = (rounded_reference(x, w, zero) if kind.startswith("int") and not as_it_is else
                        x.bfloat16().double() @ w.t() if kind == "bfloat16" else x.double() @ w.t())
            bound = 1e-5 * (x.double().abs() @ w.abs().t())
            assert got.dtype == torch.float32 and got.shape == (rows, out_features)
            assert ((got.double() - expected).abs() <= bound).all(), (kind, out_features, in_features, rows, prompt)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8", "int4 g32", "int4 g32 symmetric"])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(isa, kind):
    """Bit for bit: each of 70 rows computed alone, in its row tile and in the whole, so that a
    verify pass over k + 1 rows and a batch give each row what one row gives it; the whole has more
    than 64 rows, which the float kinds take in longer blocks of columns. The same again as a
    prompt's rows (prompt_pass), so that a prompt prefilled beside others gets what it gets alone
    (on AVX2 the float kinds' panels of 16 rows: the 6 rows past 64 in a panel of one vector)."""
    torch.manual_seed(1)
    _, args, _ = kernel_weights(kind, 37, 1088)
    x = torch.randn(70, 1088)
    for prompt in (False, True):
        with cpu_kernels.prompt_pass() if prompt else contextlib.nullcontext():
            whole = cpu_kernels.linear(x, *args)
            alone = torch.cat([cpu_kernels.linear(x[i:i + 1], *args) for i in range(70)])
            in_sevens = torch.cat([cpu_kernels.linear(x[i:i + 7], *args) for i in range(0, 70, 7)])
        assert torch.equal(whole, alone) and torch.equal(whole, in_sevens), prompt


def test_layers_run_the_engines_kernel_on_the_cpu_and_pytorchs_otherwise(monkeypatch):
    """Linear (float32 and bfloat16, no gradient wanted) and a packed Int8Linear and Int4Linear call
    layerskip.linear; a Linear whose weight wants a gradient (training) and every layer with the
    kernels switched off (as where they cannot be built) do not, and give the same products."""
    calls = []
    original = torch.ops.layerskip.linear

    def recording(*args):
        calls.append(args[1].dtype)
        return original(*args)

    monkeypatch.setattr(torch.ops.layerskip, "linear", recording)
    torch.manual_seed(2)
    w = torch.randn(40, 256) * 0.05
    layers = {"float32": Linear(256, 40, bias=False), "bfloat16": Linear(256, 40, bias=False).bfloat16(),
              "int8": Int8Linear(256, 40), "int4": Int4Linear(256, 40, 32)}
    layers["float32"].weight.data.copy_(w)
    layers["bfloat16"].weight.data.copy_(w)
    layers["int8"].codes, layers["int8"].scales = quantize.quantize_int8(w)
    layers["int4"].codes, layers["int4"].scales_and_zeros = quantize.quantize_int4(w, 32)
    fallbacks = {"int8": Int8Linear(256, 40), "int4": Int4Linear(256, 40, 32)}
    fallbacks["int8"].codes, fallbacks["int8"].scales = layers["int8"].codes, layers["int8"].scales
    fallbacks["int4"].codes, fallbacks["int4"].scales_and_zeros = layers["int4"].codes, layers["int4"].scales_and_zeros
    layers["int8"].pack()
    layers["int4"].pack()
    x = torch.randn(3, 256)
    with torch.no_grad():
        own = {name: layer(x.to(layer.weight.dtype if name == "bfloat16" else torch.float32))
               for name, layer in layers.items()}
    assert calls == [torch.float32, torch.bfloat16, torch.uint8, torch.uint8]
    calls.clear()
    trained = layers["float32"](x)  # the weight wants a gradient: autograd's product
    assert trained.requires_grad and calls == []
    monkeypatch.setattr(cpu_kernels, "isa", "")
    for name, layer in fallbacks.items():
        layer.pack()  # PyTorch's layout (int4), none (int8)
        layers[name] = layer
    with torch.no_grad():
        for name, layer in layers.items():
            theirs = layer(x.to(layer.weight.dtype if name == "bfloat16" else torch.float32)).float()
            tolerance = 1e-4 if name == "float32" else 2e-2  # int8, int4: the kernel rounds x to 8 bits
            assert (theirs - own[name].float()).abs().max() <= tolerance * theirs.abs().max(), name
    assert calls == []


def test_a_prompts_pass_is_eager_only(monkeypatch):
    """eager_prompt(): inside prompt_pass and not being compiled (a compiled prefill keeps the step's
    kernels), and the pass ends with its block."""
    assert not cpu_kernels.eager_prompt()
    with cpu_kernels.prompt_pass():
        assert cpu_kernels.eager_prompt()
        with monkeypatch.context() as compiling:
            compiling.setattr(torch.compiler, "is_compiling", lambda: True)
            assert not cpu_kernels.eager_prompt()
    assert not cpu_kernels.eager_prompt()


def test_a_prompt_prefilled_alone_or_beside_others_gets_the_same_cache_and_first_token(checkpoints):
    """prefill runs a prompt's rows through the kernels and the head one row a prompt: a bfloat16
    model's caches and first tokens for three prompts prefilled together (right-padded) equal each
    prompt's alone, bit for bit."""
    from common import prefill, right_padded
    model = load_model(checkpoints("llama32")[0], dtype=torch.bfloat16)
    torch.manual_seed(5)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (5, 30, 12)]
    model.setup_caches(3, 40)
    with torch.inference_mode():
        idx, lengths = right_padded(prompts)
        together = prefill(model, idx, lengths, torch.arange(3), 0.0, None)
        caches = [(layer.attention.kv_cache.k.clone(), layer.attention.kv_cache.v.clone())
                  for layer in model.layers]
        for r, prompt in enumerate(prompts):
            first = prefill(model, torch.tensor([prompt]), torch.tensor([len(prompt)]), torch.tensor([r]), 0.0, None)
            assert first.item() == together[r].item()
            for layer, (k, v) in zip(model.layers, caches):
                assert torch.equal(layer.attention.kv_cache.k[r, :, :len(prompt)], k[r, :, :len(prompt)])
                assert torch.equal(layer.attention.kv_cache.v[r, :, :len(prompt)], v[r, :, :len(prompt)])


def test_a_quantized_models_float_layers_take_one_row_through_the_kernel_when_compiled(monkeypatch):
    """Compiled, one float32 row is inductor's reduction (fused with its neighbours), whose last bits
    differ from the kernel's k + 1-row product; in a quantized file the next layer's 8-bit rounding
    can turn that into another token, so there every float layer (and the draft head cut from a
    float head) runs the kernel at every row count. A float model keeps the reduction for small
    weights only: a larger one streams faster through the kernel."""
    calls = []
    original = torch.ops.layerskip.linear
    monkeypatch.setattr(torch.ops.layerskip, "linear", lambda *args: calls.append(args[1].dtype) or original(*args))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layer = Linear(64, 8, bias=False)
    x = torch.randn(1, 64)
    with torch.no_grad():
        fused = layer(x)
        layer.fused_one_row = False
        assert calls == [] and torch.allclose(layer(x), fused, atol=1e-5) and calls == [torch.float32]
        large = Linear(1024, Linear.FUSED_ONE_ROW_MAX // 1024 + 1, bias=False)
        assert large.fused_one_row
        large(torch.randn(1, 1024))
        assert calls == [torch.float32, torch.float32]
    with torch.device("meta"):  # quantized_layers reads the state's names only
        model = Transformer(ModelArgs(vocab_size=64, dim=64, n_layer=2, n_head=4, n_kv_head=4, head_dim=16,
                                      intermediate_size=40))
    floats = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m.fused_one_row for m in floats)  # a float model
    quantized_layers(model, {"layers.0.attention.wqkv.codes": None}, {"mode": "int4", "groupsize": 32})
    assert isinstance(model.layers[0].attention.wqkv, Int4Linear)
    assert not any(m.fused_one_row for m in model.modules() if isinstance(m, Linear))
    assert not kept_rows(model.output, torch.arange(8)).fused_one_row


def attention_case(dtype: torch.dtype, heads: int = 4, key_heads: int = 2, batch: int = 3, queries: int = 7,
                   length: int = 40, head_dim: int = 24):
    """Random queries at the last `queries` positions of each row's filled part (rows filled to
    different lengths), `heads` queries over `key_heads` key heads, caches of `length` with garbage
    past each row's filled part, which a query must not see."""
    torch.manual_seed(3)
    q = torch.randn(batch, heads, queries, head_dim).to(dtype)
    k, v = (torch.randn(batch, key_heads, length, head_dim).to(dtype) for _ in range(2))
    filled = torch.tensor([20, 33, 9])[:batch]
    input_pos = filled[:, None] - queries + torch.arange(queries)
    return q, k, v, input_pos.clamp(min=0)


@pytest.mark.parametrize("heads, key_heads", [(4, 2), (3, 3), (8, 2), (10, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_equals_pytorchs_and_gives_each_query_the_same_bits_whatever_comes_with_it(isa, dtype, heads,
                                                                                              key_heads):
    """Against SDPA with the causal cache mask (head_dim 24: vector lanes and a scalar tail on both
    instruction sets), with 2, 1 (multi-head), 4 and 5 (a group of 4, then 1) queries per key head,
    the kernel's groups of queries read together; then each query alone, its row alone, the cache
    cut to the row's filled part and grown by garbage give it the very same bits."""
    q, k, v, input_pos = attention_case(dtype, heads, key_heads)
    got = cpu_kernels.attention(q, k, v, input_pos)
    mask = (torch.arange(k.shape[2]) <= input_pos[..., None])[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                                enable_gqa=True)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and (got.float() - expected).abs().max() <= tolerance * expected.abs().max()
    longer_k, longer_v = (torch.cat([t, torch.randn_like(t.float()).to(dtype)], dim=2) for t in (k, v))
    for b in range(q.shape[0]):
        end = int(input_pos[b].max()) + 1
        for t in range(q.shape[2]):
            one = q[b:b + 1, :, t:t + 1]
            pos = input_pos[b:b + 1, t:t + 1]
            for keys, values in ((k, v), (k[:, :, :end], v[:, :, :end]), (longer_k, longer_v)):
                alone = cpu_kernels.attention(one, keys[b:b + 1].contiguous(), values[b:b + 1].contiguous(), pos)
                assert torch.equal(alone[0, :, 0], got[b, :, t]), (b, t, keys.shape)


GUARDED = """
import ctypes, itertools, mmap, sys
import torch
import cpu_kernels, quantize
PAGE = mmap.PAGESIZE

def before_a_guard_page(t):  # a copy of t's whole storage that ends where an unreadable page begins
    nbytes = t.untyped_storage().nbytes()
    size = -(-nbytes // PAGE) * PAGE
    memory = mmap.mmap(-1, size + PAGE)
    start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + size), PAGE, 0) == 0  # PROT_NONE
    copy = torch.frombuffer(memory, dtype=torch.uint8, count=nbytes, offset=size - nbytes)
    copy.copy_(torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()))
    return copy.view(t.dtype)[:t.numel()].view(t.shape)

torch.manual_seed(0)
cpu_kernels.enable()
for isa in sys.argv[1:]:
    cpu_kernels.isa = isa
    for (out_features, in_features, group), symmetric in itertools.product(
            ((37, 352, 32), (5, 320, 64), (3, 192, 64), (6, 256, 256)), (False, True)):
        codes, sz = quantize.quantize_int4(torch.randn(out_features, in_features), group, symmetric)
        packed = before_a_guard_page(cpu_kernels.pack_int4(codes, sz, group))
        for rows in (3, 9):  # 9: on AMX's tiles
            guarded = cpu_kernels.linear(torch.randn(rows, in_features), packed, None, group)
            assert torch.equal(guarded.isfinite(), torch.ones_like(guarded, dtype=torch.bool))
    for out_features, in_features in ((37, 100), (5, 352), (6, 256)):
        codes, scales = quantize.quantize_int8(torch.randn(out_features, in_features))
        packed = before_a_guard_page(cpu_kernels.pack_int8(codes))
        guarded = cpu_kernels.linear(torch.randn(3, in_features), packed, scales)
        assert torch.equal(guarded.isfinite(), torch.ones_like(guarded, dtype=torch.bool))
        weight = before_a_guard_page(torch.randn(out_features, in_features).bfloat16())
        for rows in (3, 17):  # 17: two tiles of rows on AMX
            guarded = cpu_kernels.linear(torch.randn(rows, in_features), weight)
            assert torch.equal(guarded.isfinite(), torch.ones_like(guarded, dtype=torch.bool))
print("read nothing past the weights")
"""


def test_int8_int4_and_bfloat16_read_nothing_past_their_weights():
    """The last block of 128 columns may be partly padding and the last tile of 16 channels partly
    missing channels: int4 K = 352, 320, 192 and N = 37, 5, 3, 6, through 3 and 9 rows; int8 K = 100,
    352, 256 and N = 37, 5, 6, through 3 rows; bfloat16 (AMX's tiles: 32 columns a block, 16
    channels a tile) the same shapes through 3 and 17 rows. With the weights ending where an
    unreadable page begins, a read past them ends the process (SIGSEGV)."""
    proc = subprocess.run([sys.executable, "-c", GUARDED, *ISAS], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "read nothing past the weights" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_packing_hands_over_each_run_of_rows_once_laid_out():
    """pack_int8 and pack_int4 call done with consecutive runs of the codes' rows, views into them,
    that together are all of them: load_model hands their pages of the file back as it goes."""
    rows = cpu_kernels.TILE * cpu_kernels.PACK_TILES + 5
    codes8, _ = quantize.quantize_int8(torch.randn(rows, 64))
    codes4, sz = quantize.quantize_int4(torch.randn(rows, 64), 32)
    for codes, pack in ((codes8, lambda done: cpu_kernels.pack_int8(codes8, done)),
                        (codes4, lambda done: cpu_kernels.pack_int4(codes4, sz, 32, done))):
        runs = []
        pack(runs.append)
        assert len(runs) == 2 and runs[0].data_ptr() == codes.data_ptr() and torch.equal(torch.cat(runs), codes)


def test_int8_and_int4_refuse_weights_not_packed_for_them():
    """Codes as the file holds them, a packing for another group size or K and a packed view
    without its storage's padding: each a clear error, never a read past the tensor."""
    codes, sz = quantize.quantize_int4(torch.randn(8, 256), 32)
    packed = cpu_kernels.pack_int4(codes, sz, 32)
    x = torch.randn(2, 256)
    for weight, group, message in ((codes, 32, "not packed"), (packed, 64, "not packed"),
                                   (packed.clone(), 32, "storage is short")):
        with pytest.raises(RuntimeError, match=message):
            cpu_kernels.linear(x, weight, None, group)
    codes, scales = quantize.quantize_int8(torch.randn(8, 256))
    packed = cpu_kernels.pack_int8(codes)
    for weight, columns, message in ((codes, 256, "not packed"), (packed, 384, "not packed"),
                                     (packed.clone(), 256, "storage is short")):
        with pytest.raises(RuntimeError, match=message):
            cpu_kernels.linear(torch.randn(2, columns), weight, scales)


def test_a_failed_build_says_so_in_one_line_and_keeps_pytorchs_kernels(tmp_path):
    """No C++ compiler: one line on stderr, and the layers run PyTorch's kernels."""
    code = "import cpu_kernels; print(repr(cpu_kernels.enable()))"
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "''\n", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpu kernels not built (") and "using PyTorch's" in lines[0], lines


def test_greedy_self_speculation_through_the_kernels_equals_autoregression_batched(quantized, isa):  # noqa: F811
    """int8 and int4 files in float32 activations, on each instruction set's kernels: batched rows
    (refills included) get exactly their batch-1 autoregressive tokens, autoregressive and
    self-speculative."""
    torch.manual_seed(0)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (1, 9, 4, 17)]
    for mode in ("int8", "int4", "int4 sym"):
        model = load_model(quantized("llama32", mode), dtype=torch.float32)
        reference = [batch_one(model, p, 19) for p in prompts]
        for exit_layer, k, batch_size in ((None, 0, 3), (2, 3, 3), (4, 6, 1)):
            tokens, _ = run_batch(model, prompts, 19, batch_size, exit_layer, k)
            assert tokens == reference, (mode, exit_layer, k, batch_size)
