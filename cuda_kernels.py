"""The engine's CUDA kernel for int8 weights: a product that reads the int8 codes once and sums each
output row in one fixed order, however many rows come with it.

Greedy self-speculation equals autoregression only if a row's logits are the same bits in a verify
pass of k + 1 rows as alone. PyTorch's route for an int8 weight, F.linear over the codes cast to
bfloat16, gave a row the same bits at 1 to 56 rows on an H200, but it writes and reads a bfloat16
copy of the weight every step (200-320 GB/s of codes there, against 500-2800 here at one row), and
what inductor makes of the cast and the product is its choice per row count (with coordinate-descent
tuning a lone row became a reduction summed in another order). Here each program computes one
row's block of outputs with the same code and tile sizes at every row count. Triton ships with
PyTorch's CUDA builds; model.py imports this file only when an int8 layer runs on CUDA.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

# Outputs per program and input columns per step; fixed: they set the order of the sum. Measured on
# an H200, one row through 3072x2048, 8192x2048, 2048x8192 and 128256x2048 codes: 8 x 256 read
# 537, 1164, 494 and 2800 GB/s, the best of seven tilings (16 x 128: 317, 819, 265, 2606).
BLOCK_N, BLOCK_K = 8, 256


@triton.jit
def _int8_rows(x_ptr, codes_ptr, scales_ptr, y_ptr, N, K, x_stride, y_stride,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Rows vary fastest: the programs that read one block of codes run side by side, so all but the
    # first may find it in L2 (at 7 rows the H200 took 1.6-5.3x one row's time: not measured further).
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * x_stride + k, mask=k < K, other=0.0).to(tl.float32)
        inside = (n[:, None] < N) & (k[None, :] < K)
        codes = tl.load(codes_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=inside, other=0)
        acc += codes.to(tl.float32) * x[None, :]  # an int8 code times a bfloat16 input is exact in float32
    y = tl.sum(acc, axis=1) * tl.load(scales_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_stride + n, y.to(y_ptr.dtype.element_ty), mask=n < N)


def int8_linear(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """x (..., K) times the int8 weight codes (N, K) * scales (N,), in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    codes, scales = codes.contiguous(), scales.contiguous()  # loaded, sharded or kept_rows' they are: no copy
    n, k = codes.shape
    y = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    grid = (rows.shape[0], triton.cdiv(n, BLOCK_N))
    _int8_rows[grid](rows, codes, scales, y, n, k, rows.stride(0), y.stride(0), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y.view(*x.shape[:-1], n)
