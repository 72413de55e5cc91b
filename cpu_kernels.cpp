// CPU linear-layer kernels for weight-streaming decoding (see cpu_kernels.py, which builds this file
// at first use). One op, layerskip::linear, compiled for AVX-512 (with and without VNNI) and for AVX2
// and chosen at run time.
//
// The kernels are written once, in the second half of this file, which the first half includes three
// times (#include __FILE__), each time inside its own namespace and `#pragma GCC target`, with LANES 16
// (AVX-512) or 8 (AVX2) and VNNI 1 or 0 (the VNNI build holds only the int8 and int4 kernels). One
// file, so that the build's hash of its sources sees every change.
//
// y[m, n] = sum_k x[m, k] * W[n, k] for float32 x, with W float32, bfloat16, int8 (times a scale
// per output channel) or int4 (q * scale + shifted zero per group of input columns); int8 and int4
// meet x quantized to 8 bits. Each tile of CHANNELS weight rows is read from memory once and applied to
// every row of x while it sits in the cache. Every (row, channel) pair accumulates its products in
// one vector register in the same order whatever the tile it falls in, so a row's result does not
// depend on how many rows come with it.
#ifndef LANES
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// Channels a thread's tile holds, and columns of a block of packed int4 weights (pack_int4).
constexpr int CHANNELS = 4;
constexpr int64_t BLOCK = 128;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
#define LANES 16
#define VNNI 0
#include __FILE__
#undef VNNI
#undef LANES
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")
namespace avx512_vnni {  // only the int8 and int4 kernels: the float ones have no use for VNNI
#define LANES 16
#define VNNI 1
#include __FILE__
#undef VNNI
#undef LANES
}  // namespace avx512_vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define LANES 8
#define VNNI 0
#include __FILE__
#undef VNNI
#undef LANES
}  // namespace avx2
#pragma GCC pop_options

// 3: AVX-512 (F, BW, VL, DQ) with VNNI, 2: without, 1: AVX2 with FMA and F16C, 0: none of them (the caller
// keeps PyTorch's kernels).
int64_t supported_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return __builtin_cpu_supports("avx512vnni") ? 3 : 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") ? 1 : 0;
}

// x (M, K) float32; weight (N, K) float32 / bfloat16 / int8 with scales (N,) float32, or int4 codes and
// scales packed by cpu_kernels.pack_int4 (uint8, no scales). Returns (M, N) float32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales,
                  int64_t group, int64_t isa) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous (M, K) float32");
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight: contiguous (N, K)");
    TORCH_CHECK(isa >= 1 && isa <= supported_isa(), "instruction set ", isa, " is not available on this CPU");
    const int64_t K = x.size(1), N = weight.size(0);
    const auto kind = weight.scalar_type();
    if (kind == at::kByte) {
        // pack_int4's layout: N x (bytes per channel) in name, the storage holds whole tiles and 16 bytes more
        const int64_t blocks = (K + BLOCK - 1) / BLOCK, per_channel = blocks * (BLOCK / 2 + 4 * std::max<int64_t>(1, BLOCK / group));
        TORCH_CHECK(group >= 32 && group <= 256 && (group & (group - 1)) == 0 && K % group == 0 &&
                    weight.size(1) == per_channel && !scales, "int4: not packed by pack_int4 for this group and K");
        TORCH_CHECK(int64_t(weight.storage().nbytes()) - weight.storage_offset() >= (N + CHANNELS - 1) / CHANNELS * CHANNELS * per_channel + 16,
                    "int4: the packed storage is short");
    } else {
        TORCH_CHECK(kind == at::kFloat || kind == at::kBFloat16 || kind == at::kChar, "weight dtype");
        TORCH_CHECK(weight.size(1) == K, "weight and x differ in K");
        TORCH_CHECK(kind != at::kChar || (scales && scales->scalar_type() == at::kFloat && scales->numel() == N),
                    "int8: scales (N,) float32");
    }
    at::Tensor y = at::empty({x.size(0), N}, x.options());
    at::Tensor s = scales ? scales->contiguous() : at::Tensor();
    if (isa == 3 && kind == at::kByte) avx512_vnni::run_int4(x, weight, group, y);
    else if (isa == 3 && kind == at::kChar) avx512_vnni::run_int8(x, weight, s, y);
    else if (isa >= 2) avx512::run(x, weight, s, group, y);
    else avx2::run(x, weight, s, group, y);
    return y;
}

// q (B, H, T, D) of queries at positions input_pos (B, T), each over its row's entries 0..position of
// the caches k, v (B, KVH, L, D), H a multiple of KVH; float32 or bfloat16, contiguous. Returns (B, H, T, D).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& input_pos,
                     int64_t isa) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0,
                "attention: q (B, H, T, D), k and v (B, KVH, L, D), contiguous");
    TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16), "attention: float32 or bfloat16");
    TORCH_CHECK(input_pos.scalar_type() == at::kLong && input_pos.is_contiguous() &&
                input_pos.numel() == q.size(0) * q.size(2), "attention: input_pos (B, T) int64");
    TORCH_CHECK(isa >= 1 && isa <= supported_isa(), "instruction set ", isa, " is not available on this CPU");
    at::Tensor out = at::empty_like(q);
    if (isa >= 2) avx512::run_attention(q, k, v, input_pos, out);
    else avx2::run_attention(q, k, v, input_pos, out);
    return out;
}

TORCH_LIBRARY(layerskip, m) {
    m.def("linear(Tensor x, Tensor weight, Tensor? scales, int group, int isa) -> Tensor");
    m.def("attention(Tensor q, Tensor k, Tensor v, Tensor input_pos, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) {
    m.impl("linear", &linear);
    m.impl("attention", &attention);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("supported_isa", &supported_isa); }

#else  // LANES: the kernels for one instruction set

#if LANES == 16
typedef __m512 vec;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vset1(float a) { return _mm512_set1_ps(a); }
static inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vload_bf16(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline float vsum(vec a) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
constexpr int ROWS = 4;  // 16 accumulators + 4 weight vectors + 1 input vector of 32 registers

typedef __m512i ivec;
static inline ivec iload(const void* p) { return _mm512_loadu_si512(p); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vcvt(ivec a) { return _mm512_cvtepi32_ps(a); }
static inline ivec nibbles(ivec bytes, int shift) { return _mm512_and_si512(_mm512_srli_epi16(bytes, shift), _mm512_set1_epi8(15)); }
static inline vec load_halves(const uint16_t* p) {  // 8 float16 as the first 8 lanes
    return _mm512_cvtph_ps(_mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline vec lookup(ivec index, vec table) { return _mm512_permutexvar_ps(index, table); }
static inline ivec lane_index(const int* p) { return _mm512_loadu_si512(p); }
// Lane j: the sum of the 4 products of bytes 4j..4j+3 of u (unsigned) and s (signed), for both pairs.
static inline ivec dot4(ivec u, ivec s, ivec u2, ivec s2) {
#if VNNI
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s), u2, s2);
#else  // pairs of products as int16 (at most 4 x 15 x 127: no overflow), then pairs of pairs
    return _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(u, s), _mm512_maddubs_epi16(u2, s2)), _mm512_set1_epi16(1));
#endif
}
static inline ivec magnitudes(ivec a) { return _mm512_abs_epi8(a); }
// Lane j: the sum of the 4 products of bytes 4j..4j+3 of w and q, both signed, as |w| (unsigned)
// times q with w's sign; |w| <= 128 keeps maddubs' pairs within int16.
static inline ivec signed_dot(ivec magnitude, ivec w, ivec q) {
    const ivec zero = _mm512_setzero_si512(), signed_q = _mm512_mask_sub_epi8(q, _mm512_movepi8_mask(w), zero, q);
#if VNNI
    return _mm512_dpbusd_epi32(zero, magnitude, signed_q);
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(magnitude, signed_q), _mm512_set1_epi16(1));
#endif
}
#else
typedef __m256 vec;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vset1(float a) { return _mm256_set1_ps(a); }
static inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vload_bf16(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline float vsum(vec a) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
constexpr int ROWS = 2;  // 8 accumulators + 4 weight vectors + 1 input vector of 16 registers

typedef __m256i ivec;
static inline ivec iload(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vcvt(ivec a) { return _mm256_cvtepi32_ps(a); }
static inline ivec nibbles(ivec bytes, int shift) { return _mm256_and_si256(_mm256_srli_epi16(bytes, shift), _mm256_set1_epi8(15)); }
static inline vec load_halves(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
static inline vec lookup(ivec index, vec table) { return _mm256_permutevar8x32_ps(table, index); }
static inline ivec lane_index(const int* p) { return iload(p); }
static inline ivec dot4(ivec u, ivec s, ivec u2, ivec s2) {  // as on AVX-512 without VNNI
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u, s), _mm256_maddubs_epi16(u2, s2)), _mm256_set1_epi16(1));
}
static inline ivec magnitudes(ivec a) { return _mm256_abs_epi8(a); }
static inline ivec signed_dot(ivec magnitude, ivec w, ivec q) {  // as on AVX-512 without VNNI
    return _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(q, w)), _mm256_set1_epi16(1));
}
#endif
constexpr int64_t ROW_BLOCK = 64;  // rows whose partial sums a thread keeps at once
// Each block of weights asks for the memory PREFETCH bytes ahead of it in its stream: the hardware's
// own prefetching alone left a core of an AMD EPYC reading int4 weights at 15 GB/s, with this at
// 19-21 (two cores 26 -> 26-32 GB/s). Prefetches never fault, so the last ones may point past the
// weights. `hint`: the cache level asked for (_MM_HINT_T0: L1, _MM_HINT_T1: L2).
constexpr int64_t PREFETCH = 4096;

template <int hint>
static inline void prefetch(const void* p, int64_t bytes) {  // the cache lines of [p, p + bytes)
    for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(static_cast<const char*>(p) + line, _mm_hint(hint));
}

// For weights read as they are, (N, K): a tile reads its CHANNELS rows side by side, so what it reads
// PREFETCH bytes later lies PREFETCH / CHANNELS bytes further along each row or, near the rows' end,
// in the thread's next tile. `row`: a channel's row, k: the column read now; `bytes` from there.
template <class T>
static inline void prefetch_row(const T* row, int64_t k, int64_t K, int64_t bytes) {
    const int64_t ahead = k + PREFETCH / CHANNELS / int64_t(sizeof(T));
    prefetch<_MM_HINT_T0>(ahead < K ? row + ahead : row + (CHANNELS - 1) * K + ahead, bytes);
}

// The output channels split over the threads in tiles of CHANNELS, the rows in blocks of ROW_BLOCK:
// add(n0, channels, m0, rows, sums) accumulates the vector sums of rows [m0, m0 + rows) x channels
// [n0, n0 + channels) from zero, and finish(m, n, sum) writes the result of row m, channel n.
template <class Add, class Finish>
static void over_tiles(int64_t M, int64_t N, const Add& add, const Finish& finish) {
    at::parallel_for(0, (N + CHANNELS - 1) / CHANNELS, 1, [&](int64_t begin, int64_t end) {
        vec sums[ROW_BLOCK][CHANNELS];
        for (int64_t t = begin; t < end; t++) {
            const int64_t n0 = t * CHANNELS;
            const int channels = int(std::min<int64_t>(CHANNELS, N - n0));
            for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
                const int64_t rows = std::min(ROW_BLOCK, M - m0);
                for (int64_t r = 0; r < rows; r++)
                    for (int c = 0; c < CHANNELS; c++) sums[r][c] = vzero();
                add(n0, channels, m0, rows, sums);
                for (int64_t r = 0; r < rows; r++)
                    for (int c = 0; c < channels; c++) finish(m0 + r, n0 + c, sums[r][c]);
            }
        }
    });
}

#if !VNNI
// Each float kind of weight: load(n, k) gives LANES weights of channel n from column k as floats,
// at(n, k) one weight (the columns past the last full vector); the kinds whose rows are `prefetched`
// ask for them ahead of use (prefetch_row).
struct Float32Weight {
    const float* w; int64_t K;
    vec load(int64_t n, int64_t k) const { return vload(w + n * K + k); }
    float at(int64_t n, int64_t k) const { return w[n * K + k]; }
    static constexpr bool prefetched = false;  // measured: no gain on a Xeon (prefetch_row); 4 KB along
                                               // each row: 20 -> 12 GB/s on one core of an AMD EPYC
};

struct BFloat16Weight {
    const uint16_t* w; int64_t K;
    vec load(int64_t n, int64_t k) const { return vload_bf16(w + n * K + k); }
    float at(int64_t n, int64_t k) const { uint32_t b = uint32_t(w[n * K + k]) << 16; float f; std::memcpy(&f, &b, 4); return f; }
    static constexpr bool prefetched = true;  // a 2-core Xeon, two threads, M = 1 / 7: 23.0 / 16.9 -> 24.2 / 18.5 GB/s
};

// Columns [k0, k1) of R rows x C channels, added to the vector sums acc[r][c] (kept in memory between
// blocks of columns: the order of the additions is the same as in one sweep).
template <int R, int C, class Weight>
static inline void tile(const Weight& wt, const float* x, int64_t K, int64_t k0, int64_t k1, int64_t n0,
                        vec (*sums)[CHANNELS]) {
    vec acc[R][C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = sums[r][c];
    for (int64_t k = k0; k < k1; k += LANES) {
        vec w[C];
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) w[c] = wt.load(n0 + c, k);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            vec xv = vload(x + r * K + k);
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) acc[r][c] = vfma(xv, w[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) sums[r][c] = acc[r][c];
}

template <int R, class Weight>
static inline void tile_channels(const Weight& wt, const float* x, int64_t K, int64_t k0, int64_t k1, int64_t n0,
                                 int channels, vec (*sums)[CHANNELS]) {
    switch (channels) {
        case 4: tile<R, 4>(wt, x, K, k0, k1, n0, sums); break;
        case 3: tile<R, 3>(wt, x, K, k0, k1, n0, sums); break;
        case 2: tile<R, 2>(wt, x, K, k0, k1, n0, sums); break;
        default: tile<R, 1>(wt, x, K, k0, k1, n0, sums); break;
    }
}

// Blocks of 64 rows and of 256 columns: a block of CHANNELS weight rows (4 KB in float32) and the
// rows' columns (64 KB at most, 8 KB for 8 rows) stay in the L1 / L2 cache while every row tile
// passes over them.
constexpr int64_t COLUMN_BLOCK = 256;

template <class Weight>
static void linear(const Weight& wt, const float* x, int64_t M, int64_t K, int64_t N, float* y) {
    static_assert(CHANNELS == 4, "tile_channels covers 1 to 4 channels");
    const int64_t full = K - K % LANES;
    auto add = [&](int64_t n0, int channels, int64_t m0, int64_t rows, vec (*sums)[CHANNELS]) {
        const float* xb = x + m0 * K;
        for (int64_t k0 = 0; k0 < full; k0 += COLUMN_BLOCK) {
            const int64_t k1 = std::min(full, k0 + COLUMN_BLOCK);
            if (Weight::prefetched)
                for (int c = 0; c < channels; c++) prefetch_row(wt.w + (n0 + c) * K, k0, K, (k1 - k0) * sizeof(*wt.w));
            int64_t m = 0;
            for (; m + ROWS <= rows; m += ROWS) tile_channels<ROWS>(wt, xb + m * K, K, k0, k1, n0, channels, sums + m);
            switch (rows - m) {  // the last rows in one tile too: each weight vector is converted once per
                                 // tile (the cases past ROWS - 1 never run)
                case 3: tile_channels<(ROWS > 3 ? 3 : 1)>(wt, xb + m * K, K, k0, k1, n0, channels, sums + m); break;
                case 2: tile_channels<(ROWS > 2 ? 2 : 1)>(wt, xb + m * K, K, k0, k1, n0, channels, sums + m); break;
                case 1: tile_channels<1>(wt, xb + m * K, K, k0, k1, n0, channels, sums + m); break;
            }
        }
    };
    over_tiles(M, N, add, [&](int64_t m, int64_t n, vec sum) {
        float s = vsum(sum);
        for (int64_t k = full; k < K; k++) s = std::fma(x[m * K + k], wt.at(n, k), s);
        y[m * N + n] = s;
    });
}

#endif  // !VNNI

// int8 and int4 weights against 8-bit activations, with integer dot products as llama.cpp computes
// them: each row of x is quantized once per product, in blocks of 32 columns with a scale each
// (d = max |x| / 127, q = round(x / d)); a block adds d * sum(code * q) times the channel's scale
// (int8), and a group of columns d * scale * sum(code * q) + shifted zero * sum(x) (int4). The
// integer sums are exact and each (row, channel) adds its floats in one order, so a row's result
// still does not depend on the rows beside it.
//
// Column k of row r goes to q[r * width + place(k)] (width: K padded to a multiple of 32, the
// columns past K quantized as 0); each run of `span` columns (4 or 8, within one block) gets its
// block's d and, where xsum is given, the sum of its columns of x: the per-lane values of a dot
// product whose lanes sum `span` columns each.
template <class Place>
static void quantize_activations(const float* x, int64_t M, int64_t K, int64_t width, int span, const Place& place,
                                 int8_t* q, float* d, float* xsum) {
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; r++)
            for (int64_t b = 0; b < width; b += 32) {
                float v[32], amax = 0.f;
                for (int i = 0; i < 32; i++) {
                    v[i] = b + i < K ? x[r * K + b + i] : 0.f;
                    amax = std::max(amax, std::fabs(v[i]));
                }
                const float inverse = amax > 0.f ? 127.f / amax : 0.f;
                for (int i = 0; i < 32; i++) q[r * width + place(b + i)] = int8_t(std::nearbyint(v[i] * inverse));
                for (int j = 0; j < 32 / span; j++) {
                    const int64_t at = (r * width + b) / span + j;
                    d[at] = amax / 127.f;
                    if (!xsum) continue;
                    float sum = 0.f;
                    for (int i = 0; i < span; i++) sum += v[span * j + i];
                    xsum[at] = sum;
                }
            }
    });
}

// int8: the codes as the file holds them, (N, K), CHANNELS rows at a time, each row asked for ahead
// of use (prefetch_row; a 2-core Xeon, two threads, 8192 x 2048, M = 1 / 7: 15 / 9 GB/s without it,
// 21 / 14 with it; 17 / 9 asking 4 KB further along each row: at K = 2048 a row the tile reads
// already). A vector holds VECTOR = 4 * LANES columns; lane j of a dot product sums columns 4j to
// 4j + 3, in one block of 32. The columns past the last full vector (K not a multiple of VECTOR)
// are added one by one.
constexpr int64_t VECTOR = 4 * LANES;

struct Int8Product {
    const int8_t* w; const float* scales; int64_t N, K, width;
    const int8_t* q; const float* d;  // the activations, d per 4 columns
};

// The tile of channels from n0 against rows [m0, m0 + rows); a tile's missing channels (past N)
// read the last channel again and their sums are not written.
static inline void int8_tile(const Int8Product& p, int64_t n0, int64_t m0, int64_t rows, vec (*sums)[CHANNELS]) {
    const int8_t* w[CHANNELS];
    for (int c = 0; c < CHANNELS; c++) w[c] = p.w + std::min(n0 + c, p.N - 1) * p.K;
    const int64_t full = p.K - p.K % VECTOR;
    for (int64_t k = 0; k < full; k += VECTOR) {
        ivec codes[CHANNELS], magnitude[CHANNELS];
        for (int c = 0; c < CHANNELS; c++) {
            prefetch_row(w[c], k, p.K, VECTOR);
            codes[c] = iload(w[c] + k);
            magnitude[c] = magnitudes(codes[c]);
        }
        for (int64_t r = 0; r < rows; r++) {
            const int64_t at = (m0 + r) * p.width + k;
            const ivec q = iload(p.q + at);
            const vec d = vload(p.d + at / 4);
#pragma GCC unroll 4
            for (int c = 0; c < CHANNELS; c++) sums[r][c] = vfma(vcvt(signed_dot(magnitude[c], codes[c], q)), d, sums[r][c]);
        }
    }
}

// x (M, K) float32 against int8 codes (N, K) with scales (N,): W = codes * scales, the scale applied
// once, to a channel's sum.
static void run_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, at::Tensor& y) {
    const int64_t M = x.size(0), K = x.size(1), N = y.size(1), width = (K + 31) / 32 * 32, full = K - K % VECTOR;
    at::Tensor q = at::empty({M * width}, x.options().dtype(at::kChar));
    at::Tensor d = at::empty({M * width / 4}, x.options());
    const Int8Product p{weight.data_ptr<int8_t>(), scales.data_ptr<float>(), N, K, width, q.data_ptr<int8_t>(), d.data_ptr<float>()};
    quantize_activations(x.data_ptr<float>(), M, K, width, 4, [](int64_t k) { return k; }, q.data_ptr<int8_t>(),
                         d.data_ptr<float>(), nullptr);
    float* yp = y.data_ptr<float>();
    auto add = [&](int64_t n0, int, int64_t m0, int64_t rows, vec (*sums)[CHANNELS]) { int8_tile(p, n0, m0, rows, sums); };
    over_tiles(M, N, add, [&](int64_t m, int64_t n, vec sum) {
        float s = vsum(sum);
        for (int64_t b = full; b < K; b += 32) {  // full is a multiple of 32: the tail's blocks start there
            int32_t dot = 0;
            for (int64_t k = b; k < std::min(K, b + 32); k++) dot += int32_t(p.w[n * K + k]) * p.q[m * width + k];
            s = std::fma(float(dot), p.d[(m * width + b) / 4], s);
        }
        yp[m * N + n] = s * p.scales[n];
    });
}

// int4: the weights are packed at load (cpu_kernels.pack_int4) so that a thread reads one stream of
// memory: per tile of CHANNELS channels and per block of BLOCK columns, the tile's codes (BLOCK / 2
// bytes a channel; high nibbles the even columns, low nibbles the odd ones), then its (scale,
// shifted zero) pairs in float16, `pairs` = max(1, BLOCK / group) a channel. Reading tiles of
// separate rows of codes and scales (8 streams a core) ran at half the rate of one stream here.
//
// A chunk of CHUNK = 8 * LANES columns (one block on AVX-512, half of one on AVX2) of a channel is
// 4 * LANES bytes of codes. Lane j of a dot product sums 4 bytes of each nibble half, columns 8j to
// 8j + 7 of the chunk, which lie in one block of 32 and in one group. The activations are laid out
// to match: per row and chunk, the codes of its even columns, then of its odd ones, and per lane
// its block's d and the sum of its 8 columns of x.
constexpr int64_t CHUNK = 8 * LANES;
constexpr int HALVES = BLOCK / CHUNK;

struct Int4Product {
    const uint8_t* w; int64_t blocks, block_bytes, pairs, chunks;
    const int8_t* q; const float* d; const float* xsum;  // the activations
    int lane_scale[HALVES][LANES], lane_zero[HALVES][LANES];  // lane j's scale and zero among a channel's pairs
};

// The tile of channels from n0 against rows [m0, m0 + rows): each chunk's codes are unpacked once
// for all the rows. A tile past the last channel holds zeros; its sums are not written.
static inline void int4_tile(const Int4Product& p, int64_t n0, int64_t m0, int64_t rows, vec (*sums)[CHANNELS]) {
    const uint8_t* block = p.w + n0 / CHANNELS * p.blocks * p.block_bytes;
    for (int64_t b = 0; b < p.blocks; b++, block += p.block_bytes) {
        // Into L2, not L1: on a 2-core Xeon (AVX-512 VNNI) 17 -> 20-21 GB/s from memory at M = 1 on two
        // threads, 9 -> 10.5 on one (int8's rows: 3% slower into L2, so they keep L1)
        prefetch<_MM_HINT_T1>(block + PREFETCH, p.block_bytes);
        const uint16_t* pairs = reinterpret_cast<const uint16_t*>(block + CHANNELS * BLOCK / 2);
        for (int h = 0; h < HALVES; h++) {
            const int64_t c = b * HALVES + h;
            const ivec scale_index = lane_index(p.lane_scale[h]), zero_index = lane_index(p.lane_zero[h]);
            ivec high[CHANNELS], low[CHANNELS];
            vec scale[CHANNELS], zero[CHANNELS];
            for (int i = 0; i < CHANNELS; i++) {
                const ivec bytes = iload(block + i * BLOCK / 2 + h * CHUNK / 2);
                high[i] = nibbles(bytes, 4);
                low[i] = nibbles(bytes, 0);
                const vec table = load_halves(pairs + i * 2 * p.pairs);
                scale[i] = lookup(scale_index, table);
                zero[i] = lookup(zero_index, table);
            }
            for (int64_t r = 0; r < rows; r++) {
                const int64_t at = (m0 + r) * p.chunks + c;
                const ivec even = iload(p.q + at * CHUNK), odd = iload(p.q + at * CHUNK + CHUNK / 2);
                const vec d = vload(p.d + at * LANES), xsum = vload(p.xsum + at * LANES);
#pragma GCC unroll 4
                for (int i = 0; i < CHANNELS; i++) {
                    const vec products = vmul(vcvt(dot4(high[i], even, low[i], odd)), d);
                    sums[r][i] = vfma(products, scale[i], vfma(zero[i], xsum, sums[r][i]));
                }
            }
        }
    }
}

// x (M, K) float32 against the packed weight of N channels (pack_int4).
static void run_int4(const at::Tensor& x, const at::Tensor& weight, int64_t group, at::Tensor& y) {
    const int64_t M = x.size(0), K = x.size(1), N = y.size(1), blocks = (K + BLOCK - 1) / BLOCK;
    const int64_t pairs = std::max<int64_t>(1, BLOCK / group), chunks = blocks * HALVES;
    at::Tensor q = at::empty({M * chunks * CHUNK}, x.options().dtype(at::kChar));
    at::Tensor d = at::empty({2, M * chunks * LANES}, x.options());
    Int4Product p{weight.data_ptr<uint8_t>(), blocks, CHANNELS * (BLOCK / 2 + 4 * pairs), pairs, chunks,
                  q.data_ptr<int8_t>(), d.data_ptr<float>(), d.data_ptr<float>() + M * chunks * LANES, {}, {}};
    for (int h = 0; h < HALVES; h++)
        for (int j = 0; j < LANES; j++) {
            const int pair = group <= BLOCK ? int((h * CHUNK + 8 * j) / group) : 0;
            p.lane_scale[h][j] = 2 * pair;
            p.lane_zero[h][j] = 2 * pair + 1;
        }
    const auto split = [](int64_t k) { return k / CHUNK * CHUNK + (k & 1) * (CHUNK / 2) + k % CHUNK / 2; };
    quantize_activations(x.data_ptr<float>(), M, K, chunks * CHUNK, 8, split, q.data_ptr<int8_t>(), d.data_ptr<float>(),
                         d.data_ptr<float>() + M * chunks * LANES);
    float* yp = y.data_ptr<float>();
    auto add = [&](int64_t n0, int, int64_t m0, int64_t rows, vec (*sums)[CHANNELS]) { int4_tile(p, n0, m0, rows, sums); };
    over_tiles(M, N, add, [&](int64_t m, int64_t n, vec sum) { yp[m * N + n] = vsum(sum); });
}

#if !VNNI
static void run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t group, at::Tensor& y) {
    const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    switch (weight.scalar_type()) {
        case at::kFloat: linear(Float32Weight{weight.data_ptr<float>(), K}, xp, M, K, N, yp); break;
        case at::kBFloat16: linear(BFloat16Weight{reinterpret_cast<const uint16_t*>(weight.data_ptr()), K}, xp, M, K, N, yp); break;
        case at::kChar: run_int8(x, weight, scales, y); break;
        default: run_int4(x, weight, group, y);
    }
}

// Attention for decoding, one query at a time: its scores over its row's cache entries 0..position
// (only the filled part is read), a softmax and the sum of the values, each in one fixed order. What
// a query gets does not depend on how many queries, rows or cache entries come with it, so a verify
// pass over k + 1 positions, a batch and a longer cache give it what a lone query gets (PyTorch's
// attention blocks its sums by all three).
static inline vec load_as_float(const float* p) { return vload(p); }
static inline vec load_as_float(const c10::BFloat16* p) { return vload_bf16(reinterpret_cast<const uint16_t*>(p)); }

template <class T>
static void attention(const T* q, const T* k, const T* v, const int64_t* input_pos, T* out,
                      int64_t B, int64_t H, int64_t Q, int64_t D, int64_t KVH, int64_t L) {
    const float scale = 1.f / std::sqrt(float(D));
    const int64_t full = D - D % LANES;
    at::parallel_for(0, B * H * Q, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> weights(L), sums(D);
        for (int64_t i = begin; i < end; i++) {  // i = (b * H + h) * Q + t
            const int64_t b = i / (H * Q), h = i / Q % H;
            const int64_t last = std::min(input_pos[b * Q + i % Q], L - 1);
            const T* qi = q + i * D;
            const T* keys = k + (b * KVH + h / (H / KVH)) * L * D;
            const T* values = v + (b * KVH + h / (H / KVH)) * L * D;
            float most = -INFINITY;
            for (int64_t j = 0; j <= last; j++) {
                vec acc = vzero();
                for (int64_t d = 0; d < full; d += LANES) acc = vfma(load_as_float(qi + d), load_as_float(keys + j * D + d), acc);
                float score = vsum(acc);
                for (int64_t d = full; d < D; d++) score = std::fma(float(qi[d]), float(keys[j * D + d]), score);
                weights[j] = score * scale;
                most = std::max(most, weights[j]);
            }
            float total = 0.f;
            for (int64_t j = 0; j <= last; j++) {
                weights[j] = std::exp(weights[j] - most);
                total += weights[j];
            }
            std::fill(sums.begin(), sums.end(), 0.f);
            for (int64_t j = 0; j <= last; j++) {
                const vec w = vset1(weights[j]);
                for (int64_t d = 0; d < full; d += LANES)
                    vstore(sums.data() + d, vfma(w, load_as_float(values + j * D + d), vload(sums.data() + d)));
                for (int64_t d = full; d < D; d++) sums[d] = std::fma(weights[j], float(values[j * D + d]), sums[d]);
            }
            for (int64_t d = 0; d < D; d++) out[i * D + d] = T(sums[d] / total);
        }
    });
}

static void run_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& input_pos,
                          at::Tensor& out) {
    const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3), KVH = k.size(1), L = k.size(2);
    if (q.scalar_type() == at::kFloat)
        attention(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), input_pos.data_ptr<int64_t>(),
                  out.data_ptr<float>(), B, H, Q, D, KVH, L);
    else
        attention(q.data_ptr<c10::BFloat16>(), k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(),
                  input_pos.data_ptr<int64_t>(), out.data_ptr<c10::BFloat16>(), B, H, Q, D, KVH, L);
}
#endif  // !VNNI

#endif  // LANES
