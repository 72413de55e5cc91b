// CPU linear-layer kernels for weight-streaming decoding (see cpu_kernels.py, which builds this file
// at first use). One op, layerskip::linear, compiled for AVX-512 and for AVX2 and chosen at run time.
//
// The kernels are written once, in the second half of this file, which the first half includes twice
// (#include __FILE__), each time inside its own namespace and `#pragma GCC target`, with LANES 16
// (AVX-512) and 8 (AVX2). One file, so that the build's hash of its sources sees every change.
//
// y[m, n] = sum_k x[m, k] * W[n, k] for float32 x, with W float32, bfloat16, int8 (times a scale
// per output channel) or int4 (q * scale + shifted zero per group of input columns). Each tile of
// CHANNELS weight rows is read from memory once and applied to every row of x while it sits in the
// cache. Every (row, channel) pair accumulates its products in one vector register in the same order
// whatever the tile it falls in, so a row's result does not depend on how many rows come with it.
#ifndef LANES
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
#define LANES 16
#include __FILE__
#undef LANES
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define LANES 8
#include __FILE__
#undef LANES
}  // namespace avx2
#pragma GCC pop_options

// 2: AVX-512 (F, BW, VL, DQ), 1: AVX2 with FMA, 0: neither (the caller keeps PyTorch's kernels).
int64_t supported_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

// x (M, K) float32; weight (N, K) float32 / bfloat16 / int8 with scales (N,) float32, or uint8 (N, K / 2)
// int4 codes with scales (N, K / group, 2) float32 holding (scale, zero - 8 scale). Returns (M, N) float32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales,
                  int64_t group, int64_t isa) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous (M, K) float32");
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight: contiguous (N, K)");
    TORCH_CHECK(isa >= 1 && isa <= supported_isa(), "instruction set ", isa, " is not available on this CPU");
    const int64_t K = x.size(1), N = weight.size(0);
    const auto kind = weight.scalar_type();
    if (kind == at::kByte) {
        TORCH_CHECK(group >= 32 && (group & (group - 1)) == 0 && K % group == 0 && weight.size(1) * 2 == K, "int4: bad group or shape");
        TORCH_CHECK(scales && scales->scalar_type() == at::kFloat && scales->is_contiguous() &&
                    scales->numel() == N * (K / group) * 2, "int4: scales (N, K / group, 2) float32");
    } else {
        TORCH_CHECK(kind == at::kFloat || kind == at::kBFloat16 || kind == at::kChar, "weight dtype");
        TORCH_CHECK(weight.size(1) == K, "weight and x differ in K");
        TORCH_CHECK(kind != at::kChar || (scales && scales->scalar_type() == at::kFloat && scales->numel() == N),
                    "int8: scales (N,) float32");
    }
    at::Tensor y = at::empty({x.size(0), N}, x.options());
    at::Tensor s = scales ? scales->contiguous() : at::Tensor();
    if (isa == 2) avx512::run(x, weight, s, group, y);
    else avx2::run(x, weight, s, group, y);
    return y;
}

TORCH_LIBRARY(layerskip, m) {
    m.def("linear(Tensor x, Tensor weight, Tensor? scales, int group, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(layerskip, CPU, m) { m.impl("linear", &linear); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("supported_isa", &supported_isa); }

#else  // LANES: the kernels for one instruction set

#if LANES == 16
typedef __m512 vec;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vset1(float a) { return _mm512_set1_ps(a); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vload_bf16(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vec vload_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline float vsum(vec a) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
constexpr int ROWS = 4;  // 16 accumulators + 4 weight vectors + 1 input vector of 32 registers
#else
typedef __m256 vec;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vset1(float a) { return _mm256_set1_ps(a); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vload_bf16(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vec vload_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
static inline float vsum(vec a) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
constexpr int ROWS = 2;  // 8 accumulators + 4 weight vectors + 1 input vector of 16 registers
#endif
constexpr int CHANNELS = 4;

// Each kind of weight: load(n, k, scale, out) gives `vectors` x LANES weights of channel n from
// column k as floats, with scale = group_scale(n, k) for the group of columns that holds k (int4's
// groups; the other kinds have one group, the whole row), at(n, k) one weight (the columns past the
// last full vector) and finish(n, sum) the channel's result.
struct NoScale {};

struct Float32Weight {
    const float* w; int64_t K;
    int64_t group_size() const { return K; }
    NoScale group_scale(int64_t, int64_t) const { return {}; }
    static constexpr int vectors = 1;
    void load(int64_t n, int64_t k, NoScale, vec* out) const { out[0] = vload(w + n * K + k); }
    float at(int64_t n, int64_t k) const { return w[n * K + k]; }
    float finish(int64_t, float s) const { return s; }
};

struct BFloat16Weight {
    const uint16_t* w; int64_t K;
    int64_t group_size() const { return K; }
    NoScale group_scale(int64_t, int64_t) const { return {}; }
    static constexpr int vectors = 1;
    void load(int64_t n, int64_t k, NoScale, vec* out) const { out[0] = vload_bf16(w + n * K + k); }
    float at(int64_t n, int64_t k) const { uint32_t b = uint32_t(w[n * K + k]) << 16; float f; std::memcpy(&f, &b, 4); return f; }
    float finish(int64_t, float s) const { return s; }
};

struct Int8Weight {  // W = codes * scales[n]: the scale is applied once, to the sum
    const int8_t* w; const float* scales; int64_t K;
    int64_t group_size() const { return K; }
    NoScale group_scale(int64_t, int64_t) const { return {}; }
    static constexpr int vectors = 1;
    void load(int64_t n, int64_t k, NoScale, vec* out) const { out[0] = vload_i8(w + n * K + k); }
    float at(int64_t n, int64_t k) const { return w[n * K + k]; }
    float finish(int64_t n, float s) const { return s * scales[n]; }
};

#if LANES == 16
// int4 on AVX-512: the 16 values a group's codes stand for, q * scale + shifted zero, sit in one
// register and a permute looks each code up (no conversion, no arithmetic per weight). Unpacked as
// they come, a block of 32 columns gives its even columns (the high nibbles) and then its odd ones:
// x is put in that order first (int4_order).
struct Int4Scale { vec table; };

struct Int4Weight {  // scales (N, K / group, 2): scale, shifted zero
    const uint8_t* w; const float* scales; int64_t K, group, groups, group_shift;
    int64_t group_size() const { return group; }
    Int4Scale group_scale(int64_t n, int64_t k) const {
        const float* s = scales + (n * groups + (k >> group_shift)) * 2;  // no division: it would cost more than the group
        const vec codes = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        return {vfma(codes, vset1(s[0]), vset1(s[1]))};
    }
    static constexpr int vectors = 2;  // 32 columns: 16 bytes
    void load(int64_t n, int64_t k, Int4Scale s, vec* out) const {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n * K + k) / 2)));
        out[0] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), s.table);  // the low 4 bits index
        out[1] = _mm512_permutexvar_ps(bytes, s.table);
    }
    float at(int64_t, int64_t) const { return 0.f; }  // K is a multiple of the group, itself of 32
    float finish(int64_t, float s) const { return s; }
};

static at::Tensor int4_order(const at::Tensor& x) {
    return x.view({x.size(0), -1, 16, 2}).transpose(2, 3).contiguous().view({x.size(0), -1});
}
#else
// 8 columns of int4 codes, two a byte with the even column in the high nibble, as float q.
static inline vec vload_u4(const uint8_t* p) {
    int32_t four_bytes;
    std::memcpy(&four_bytes, p, 4);
    __m128i b = _mm_cvtsi32_si128(four_bytes), low4 = _mm_set1_epi8(15);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4), lo = _mm_and_si128(b, low4);
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)));
}

struct Int4Scale { vec scale, zero; };

struct Int4Weight {  // W = q * scale + shifted_zero, both per (channel, group): (N, K / group, 2)
    const uint8_t* w; const float* scales; int64_t K, group, groups, group_shift;
    int64_t group_size() const { return group; }
    Int4Scale group_scale(int64_t n, int64_t k) const {
        const float* s = scales + (n * groups + (k >> group_shift)) * 2;  // no division: it would cost more than the group
        return {vset1(s[0]), vset1(s[1])};
    }
    static constexpr int vectors = 1;
    void load(int64_t n, int64_t k, Int4Scale s, vec* out) const { out[0] = vfma(vload_u4(w + (n * K + k) / 2), s.scale, s.zero); }
    float at(int64_t, int64_t) const { return 0.f; }  // K is a multiple of the group, itself of LANES
    float finish(int64_t, float s) const { return s; }
};

static const at::Tensor& int4_order(const at::Tensor& x) { return x; }  // vload_u4 keeps the columns' order
#endif

// Columns [k0, k1) of R rows x C channels, added to the vector sums acc[r][c] (kept in memory between
// blocks of columns: the order of the additions is the same as in one sweep).
template <int R, int C, class Weight>
static inline void tile(const Weight& wt, const float* x, int64_t K, int64_t k0, int64_t k1, int64_t n0,
                        vec (*sums)[CHANNELS]) {
    vec acc[R][C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = sums[r][c];
    const int64_t span = std::min(wt.group_size(), k1 - k0);  // int4: blocks hold whole groups
    for (int64_t g = k0; g < k1; g += span) {
        decltype(wt.group_scale(0, 0)) scale[C];
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) scale[c] = wt.group_scale(n0 + c, g);
        const int64_t end = std::min(k1, g + span);
        constexpr int V = Weight::vectors;
        for (int64_t k = g; k < end; k += V * LANES) {
            vec w[C][V];
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) wt.load(n0 + c, k, scale[c], w[c]);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
#pragma GCC unroll 2
                for (int v = 0; v < V; v++) {
                    vec xv = vload(x + r * K + k + v * LANES);
#pragma GCC unroll 4
                    for (int c = 0; c < C; c++) acc[r][c] = vfma(xv, w[c][v], acc[r][c]);
                }
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
// passes over them; 256 is a multiple of every int4 group size.
constexpr int64_t ROW_BLOCK = 64, COLUMN_BLOCK = 256;

template <class Weight>
static void linear(const Weight& wt, const float* x, int64_t M, int64_t K, int64_t N, float* y) {
    static_assert(CHANNELS == 4, "tile_channels covers 1 to 4 channels");
    const int64_t tiles = (N + CHANNELS - 1) / CHANNELS, full = K - K % LANES;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        vec sums[ROW_BLOCK][CHANNELS];
        for (int64_t t = begin; t < end; t++) {
            const int64_t n0 = t * CHANNELS;
            const int channels = int(std::min<int64_t>(CHANNELS, N - n0));
            for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
                const int64_t rows = std::min(ROW_BLOCK, M - m0);
                const float* xb = x + m0 * K;
                for (int64_t r = 0; r < rows; r++)
                    for (int c = 0; c < CHANNELS; c++) sums[r][c] = vzero();
                for (int64_t k0 = 0; k0 < full; k0 += COLUMN_BLOCK) {
                    const int64_t k1 = std::min(full, k0 + COLUMN_BLOCK);
                    int64_t m = 0;
                    for (; m + ROWS <= rows; m += ROWS) tile_channels<ROWS>(wt, xb + m * K, K, k0, k1, n0, channels, sums + m);
                    switch (rows - m) {  // the last rows in one tile too: each weight vector is converted once per
                                         // tile (the cases past ROWS - 1 never run)
                        case 3: tile_channels<(ROWS > 3 ? 3 : 1)>(wt, xb + m * K, K, k0, k1, n0, channels, sums + m); break;
                        case 2: tile_channels<(ROWS > 2 ? 2 : 1)>(wt, xb + m * K, K, k0, k1, n0, channels, sums + m); break;
                        case 1: tile_channels<1>(wt, xb + m * K, K, k0, k1, n0, channels, sums + m); break;
                    }
                }
                for (int64_t r = 0; r < rows; r++)
                    for (int c = 0; c < channels; c++) {
                        float s = vsum(sums[r][c]);
                        for (int64_t k = full; k < K; k++) s = std::fma(xb[r * K + k], wt.at(n0 + c, k), s);
                        y[(m0 + r) * N + n0 + c] = wt.finish(n0 + c, s);
                    }
            }
        }
    });
}

static void run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t group, at::Tensor& y) {
    const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    switch (weight.scalar_type()) {
        case at::kFloat: linear(Float32Weight{weight.data_ptr<float>(), K}, xp, M, K, N, yp); break;
        case at::kBFloat16: linear(BFloat16Weight{reinterpret_cast<const uint16_t*>(weight.data_ptr()), K}, xp, M, K, N, yp); break;
        case at::kChar: linear(Int8Weight{weight.data_ptr<int8_t>(), scales.data_ptr<float>(), K}, xp, M, K, N, yp); break;
        default: {
            const at::Tensor ordered = int4_order(x);
            const Int4Weight wt{weight.data_ptr<uint8_t>(), scales.data_ptr<float>(), K, group, K / group, __builtin_ctzll(group)};
            linear(wt, ordered.data_ptr<float>(), M, K, N, yp);
        }
    }
}

#endif  // LANES
