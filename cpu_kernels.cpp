// CPU linear-layer kernels for weight-streaming decoding (see cpu_kernels.py, which builds this file
// at first use). One op, layerskip::linear, compiled for AVX-512 (with and without VNNI, with and
// without bfloat16 dot products) and for AVX2 and chosen at run time; int4 products of several rows use
// AMX's int8 tiles where the CPU has them, bfloat16 products of any rows its bfloat16 tiles.
//
// The kernels are written once, in the second half of this file, which the first half includes four
// times (#include __FILE__), each time inside its own namespace and `#pragma GCC target`, with LANES 16
// (AVX-512) or 8 (AVX2), VNNI 1 or 0 (the VNNI build holds only the int8 and int4 kernels) and BF16 1
// or 0 (the BF16 build holds only the bfloat16 kernel, on AVX-512's bfloat16 dot products where the
// CPU has them, on AMX's bfloat16 tiles where it has those). One file, so that the build's hash of its
// sources sees every change.
//
// y[m, n] = sum_k x[m, k] * W[n, k] for float32 x, with W float32, bfloat16, int8 (times a scale
// per output channel) or int4 (q * scale + shifted zero per group of input columns); bfloat16 meets
// x rounded to bfloat16 (a bfloat16 model's activations are), int8 and int4 x quantized to 8 bits.
// Each tile of weight rows is read from memory once and applied to every row of x while it sits in
// the cache. Every (row, channel) pair accumulates its products in the same order whatever the tile
// it falls in, so a row's result does not depend on how many rows come with it.
#ifndef LANES
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// Channels a thread's tile holds (float weights; packed int8 and int4: TILE_CHANNELS), and columns
// of a block of packed weights (pack_int8, pack_int4).
constexpr int CHANNELS = 4;
constexpr int TILE_CHANNELS = 16;
constexpr int64_t BLOCK = 128;

// Bytes of a channel in pack_int4's layout: each block of BLOCK columns holds its codes (4 bits each)
// and, for each of its max(1, BLOCK / group) groups, a float16 scale and, but for symmetric codes, a
// float16 shifted zero.
static inline int64_t int4_channel_bytes(int64_t K, int64_t group, bool symmetric) {
    const int64_t blocks = (K + BLOCK - 1) / BLOCK, pairs = std::max<int64_t>(1, BLOCK / group);
    return blocks * (BLOCK / 2 + (symmetric ? 2 : 4) * pairs);
}

// How far ahead prefetch_row asks for a tile's weight rows, and into which cache, differs by CPU:
// measured on 8192 x 2048 from memory, M = 1 / 7, GB/s. A 2-core AMD EPYC with AVX-512 (family 25,
// model 17) read float32 at 20-22 / 15 on two threads (12-14 / 8 on one) asking 1 KB along each row
// into L1, at 28-38 / 22-25 (17-21 / 13-15) asking 4 KB along each row into L2; bfloat16 at one row
// gained as much. A 2-core AMD EPYC without it (AVX2 only, family 25, model 1) read float32 fastest
// asking for nothing: two threads, one row, 8192 x 2048 / 2048 x 8192 / 128256 x 2048, two rounds:
// 29.7, 29.6 / 29.4, 34.5 / 29.1, 28.6 against 20.7, 22.7 / 22.1, 25.2 / 22.4, 20.7 into L2 and
// 24.6, 23.7 / 24.8, 28.2 / 25.1, 22.9 into L1. A 2-core Xeon gained from L1 at 1 KB (the comments
// at Float32Weight).
enum RowsAhead { INTO_L1, INTO_L2, NOT_ASKED };
static const RowsAhead rows_ahead = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_is("amd")) return INTO_L1;
    return __builtin_cpu_supports("avx512f") ? INTO_L2 : NOT_ASKED;
}();

#define BF16 0
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,amx-tile,amx-int8")
namespace avx512_vnni {  // only the int8 and int4 kernels: the float ones have no use for VNNI; the tile
                         // instructions run only where supported_isa says 4
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
#undef BF16

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")
namespace avx512_bf16 {  // only the bfloat16 kernel, run where the CPU has AVX-512's bfloat16 dot products
                         // (its tiles where it has AMX's bfloat16 tiles and supported_isa says 4)
#define LANES 16
#define VNNI 0
#define BF16 1
#include __FILE__
#undef BF16
#undef VNNI
#undef LANES
}  // namespace avx512_bf16
#pragma GCC pop_options

static const bool bfloat16_dot = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
}();

// AMX's int8 tiles, where the CPU has them and Linux grants them: a process must ask for the tile
// registers' state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA) before its first tile
// instruction.
static bool amx_granted() {
    static const bool granted = [] {
        unsigned a, b, c, d;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
        return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    }();
    return granted;
}

// AMX's bfloat16 tiles too (CPUID leaf 7: EDX bit 22), where the int8 ones are granted.
static bool amx_bfloat16() {
    static const bool granted = [] {
        unsigned a, b, c, d;
        return amx_granted() && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22));
    }();
    return granted;
}

// 4: AVX-512 with VNNI and AMX's int8 tiles (and its bfloat16 ones where amx_bfloat16), 3: with VNNI,
// 2: without, 1: AVX2 with FMA and F16C, 0: none of them (the caller keeps PyTorch's kernels).
int64_t supported_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return __builtin_cpu_supports("avx512vnni") ? (amx_granted() ? 4 : 3) : 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") ? 1 : 0;
}

// x (M, K) float32; weight (N, K) float32 / bfloat16, int8 codes packed by cpu_kernels.pack_int8 (uint8)
// with scales (N,) float32, or int4 codes and scales packed by cpu_kernels.pack_int4 (uint8, no
// scales). `prompt`: the rows are a prompt's (cpu_kernels.prompt_pass). Returns (M, N) float32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales,
                  int64_t group, int64_t isa, bool prompt) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous (M, K) float32");
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight: contiguous (N, K)");
    TORCH_CHECK(isa >= 1 && isa <= supported_isa(), "instruction set ", isa, " is not available on this CPU");
    const int64_t K = x.size(1), N = weight.size(0);
    const auto kind = weight.scalar_type();
    if (kind == at::kByte) {
        // pack_int8's and pack_int4's layouts: N x (bytes per channel) in name, the storage holds whole tiles
        const int64_t blocks = (K + BLOCK - 1) / BLOCK;
        const int64_t stored = int64_t(weight.storage().nbytes()) - weight.storage_offset();
        const int64_t stored_channels = (N + TILE_CHANNELS - 1) / TILE_CHANNELS * TILE_CHANNELS;  // whole tiles
        if (scales) {
            const int64_t per_channel = blocks * BLOCK;
            TORCH_CHECK(weight.size(1) == per_channel && group == 0, "int8: not packed by pack_int8 for this K");
            TORCH_CHECK(stored >= stored_channels * per_channel, "int8: the packed storage is short");
            TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->numel() == N, "int8: scales (N,) float32");
        } else {
            TORCH_CHECK(group >= 32 && group <= 256 && (group & (group - 1)) == 0 && K % group == 0,
                        "int4: not packed by pack_int4 for this group and K");
            TORCH_CHECK(weight.size(1) == int4_channel_bytes(K, group, false) ||
                            weight.size(1) == int4_channel_bytes(K, group, true),
                        "int4: not packed by pack_int4 for this group and K");
            TORCH_CHECK(stored >= stored_channels * weight.size(1), "int4: the packed storage is short");
        }
    } else {
        TORCH_CHECK(kind != at::kChar, "int8: codes as the file holds them, not packed by pack_int8");
        TORCH_CHECK(kind == at::kFloat || kind == at::kBFloat16, "weight dtype");
        TORCH_CHECK(weight.size(1) == K, "weight and x differ in K");
    }
    at::Tensor y = at::empty({x.size(0), N}, x.options());
    at::Tensor s = scales ? scales->contiguous() : at::Tensor();
    if (isa >= 3 && kind == at::kByte && scales) avx512_vnni::run_int8(x, weight, s, y);
    else if (isa >= 3 && kind == at::kByte) avx512_vnni::run_int4(x, weight, group, y, isa == 4);
    else if (isa >= 3 && kind == at::kBFloat16 && bfloat16_dot)
        avx512_bf16::run_bfloat16(x, weight, y, isa == 4 && amx_bfloat16());
    else if (isa >= 2) avx512::run(x, weight, s, group, y);
    else if (prompt && (kind != at::kByte || scales)) avx2::run_prompt(x, weight, s, y);
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
    m.def("linear(Tensor x, Tensor weight, Tensor? scales, int group, int isa, bool prompt) -> Tensor");
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
constexpr int ROWS = 4;  // 16 accumulators + 4 input vectors + 1 weight vector of 32 registers

typedef __m512i ivec;
static inline ivec iload(const void* p) { return _mm512_loadu_si512(p); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vcvt(ivec a) { return _mm512_cvtepi32_ps(a); }
static inline ivec nibbles(ivec bytes, int shift) { return _mm512_and_si512(_mm512_srli_epi16(bytes, shift), _mm512_set1_epi8(15)); }
static inline vec vload_halves(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vabs(vec a) { return _mm512_abs_ps(a); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline float vmax_all(vec a) { return _mm512_reduce_max_ps(a); }
// vsum of a[0..3] at once, each sum in vsum's order: its halves, quarters, then pairs of lanes added
static inline void vsum4(const vec* a, float* out) {
    const vec ab = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xee));
    const vec cd = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xee));
    vec x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));  // a quarter each
    x = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));
    alignas(64) float all[16];
    _mm512_store_ps(all, x);
    for (int i = 0; i < 4; i++) out[i] = all[4 * i];
}
static inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vtimes_pow2(vec a, vec n) { return _mm512_scalef_ps(a, n); }  // a * 2^n, n a whole number
static inline vec vkeep_first(vec a, int n) { return _mm512_maskz_mov_ps(__mmask16((1u << n) - 1), a); }  // lanes >= n: 0
// LANES values rounded to the nearest integer (ties to even, as std::nearbyint), stored as int8
static inline void vstore_rounded(int8_t* p, vec a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(a)));
}
// x's 4 bytes q[4r..4r+3] in every lane, broadcast from memory: read into a general register first
// (as a copy to an int32_t array compiles), each broadcast took a second instruction of the vector unit
static inline ivec quad(const int8_t* q, int r) { return _mm512_broadcastd_epi32(_mm_loadu_si32(q + 4 * r)); }
// Lane j: the sum over r of the 4 products of bytes 4j..4j+3 of w[r] (unsigned; at most 15 without
// VNNI) and the 4 bytes q[4r..4r+3] (signed), r = 0..7: one channel's span of 32 columns against x's.
static inline ivec span_dot(const ivec* w, const int8_t* q) {
#if VNNI  // four chains of two: in two chains of four, each dot product waiting on the one before it, a
          // core of a 2-core AMD EPYC ran int4 codes in its cache at 37 G weights/s for one row (now 55-58)
          // and 13 for 7 rows (now 17-19), with the broadcasts below in general registers
    ivec s[4];
    for (int r = 0; r < 4; r++) s[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r], quad(q, r));
    for (int r = 4; r < 8; r++) s[r - 4] = _mm512_dpbusd_epi32(s[r - 4], w[r], quad(q, r));
    return _mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(s[2], s[3]));
#else  // pairs of products as int16, summed in int16 (at most 16 x 15 x 127: no overflow), then pairs of pairs
    ivec pairs = _mm512_maddubs_epi16(w[0], quad(q, 0));
    for (int r = 1; r < 8; r++) pairs = _mm512_add_epi16(pairs, _mm512_maddubs_epi16(w[r], quad(q, r)));
    return _mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
#endif
}
// 16 a + b and a - v in each 32-bit lane
static inline ivec sixteen_times_plus(ivec a, ivec b) { return _mm512_add_epi32(_mm512_slli_epi32(a, 4), b); }
static inline ivec minus(ivec a, int32_t v) { return _mm512_sub_epi32(a, _mm512_set1_epi32(v)); }
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
constexpr int ROWS = 3;  // 12 accumulators + 3 input vectors + 1 weight vector of 16 registers

typedef __m256i ivec;
static inline ivec iload(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vcvt(ivec a) { return _mm256_cvtepi32_ps(a); }
static inline ivec nibbles(ivec bytes, int shift) { return _mm256_and_si256(_mm256_srli_epi16(bytes, shift), _mm256_set1_epi8(15)); }
static inline vec vload_halves(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vabs(vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline float vmax_all(vec a) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
static inline void vsum4(const vec* a, float* out) {  // as on AVX-512
    alignas(32) float all[8];
    for (int i = 0; i < 4; i += 2) {
        vec x = _mm256_add_ps(_mm256_permute2f128_ps(a[i], a[i + 1], 0x20), _mm256_permute2f128_ps(a[i], a[i + 1], 0x31));
        x = _mm256_add_ps(x, _mm256_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));
        x = _mm256_add_ps(x, _mm256_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));
        _mm256_store_ps(all, x);
        out[i] = all[0];
        out[i + 1] = all[4];
    }
}
static inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vtimes_pow2(vec a, vec n) {  // n a whole number in [-126, 127]: 2^n built in the exponent bits
    return _mm256_mul_ps(a, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
}
static inline vec vkeep_first(vec a, int n) {  // lanes >= n: 0
    return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
}
static inline void vstore_rounded(int8_t* p, vec a) {  // as on AVX-512 (|a| <= 127: the packs do not saturate)
    const __m256i i = _mm256_cvtps_epi32(a);
    const __m128i pairs = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(pairs, pairs));
}
static inline ivec quad(const int8_t* q, int r) { return _mm256_broadcastd_epi32(_mm_loadu_si32(q + 4 * r)); }
static inline ivec span_dot(const ivec* w, const int8_t* q) {  // as on AVX-512 without VNNI
    ivec pairs = _mm256_maddubs_epi16(w[0], quad(q, 0));
    for (int r = 1; r < 8; r++) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[r], quad(q, r)));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
static inline ivec sixteen_times_plus(ivec a, ivec b) { return _mm256_add_epi32(_mm256_slli_epi32(a, 4), b); }
static inline ivec minus(ivec a, int32_t v) { return _mm256_sub_epi32(a, _mm256_set1_epi32(v)); }
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
// in the thread's next tile; into L2 (rows_ahead, a template argument so that the inner loops keep
// no branch), it asks for what it reads CHANNELS times later than that. `row`: a channel's row, k: the
// column read now; `bytes` from there.
template <RowsAhead where, class T>
static inline void prefetch_row(const T* row, int64_t k, int64_t K, int64_t bytes) {
    if (where == NOT_ASKED) return;
    const int64_t ahead = k + (where == INTO_L2 ? PREFETCH : PREFETCH / CHANNELS) / int64_t(sizeof(T));
    prefetch<where == INTO_L2 ? _MM_HINT_T1 : _MM_HINT_T0>(ahead < K ? row + ahead : row + (CHANNELS - 1) * K + ahead, bytes);
}

struct NoThreadState {
    explicit NoThreadState(int64_t) {}
};

// The output channels split over the threads in tiles of TILE, the rows in blocks of ROW_BLOCK, each
// row of a tile with VECS vector sums: add(n0, channels, m0, rows, sums) accumulates the sums of rows
// [m0, m0 + rows) x channels [n0, n0 + channels) from zero, and finish(m, n0, channels, sums[r])
// writes row m's results. A ThreadState(M) lives while a thread works through its tiles.
template <int TILE, int VECS, class ThreadState = NoThreadState, class Add, class Finish>
static void over_tiles(int64_t M, int64_t N, const Add& add, const Finish& finish) {
    at::parallel_for(0, (N + TILE - 1) / TILE, 1, [&](int64_t begin, int64_t end) {
        ThreadState state(M);
        vec sums[ROW_BLOCK][VECS];
        for (int64_t t = begin; t < end; t++) {
            const int64_t n0 = t * TILE;
            const int channels = int(std::min<int64_t>(TILE, N - n0));
            for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
                const int64_t rows = std::min(ROW_BLOCK, M - m0);
                for (int64_t r = 0; r < rows; r++)
                    for (int c = 0; c < VECS; c++) sums[r][c] = vzero();
                add(n0, channels, m0, rows, sums);
                for (int64_t r = 0; r < rows; r++) finish(m0 + r, n0, channels, sums[r]);
            }
        }
    });
}

#if VNNI || BF16
// AMX's tile registers, configured for this thread while it lives (palette 1): tile i (0-7) holds
// rows(i) rows of colsb(i) bytes.
struct AmxTiles {
    template <class Rows, class Bytes>
    AmxTiles(const Rows& rows, const Bytes& colsb) {
        struct {
            uint8_t palette = 1, start_row = 0, reserved[14] = {};
            uint16_t colsb[16] = {};
            uint8_t rows[16] = {};
        } config;
        for (int i = 0; i < 8; i++) config.rows[i] = uint8_t(rows(i)), config.colsb[i] = uint16_t(colsb(i));
        _tile_loadconfig(&config);
    }
    ~AmxTiles() { _tile_release(); }
};
#endif

#if !VNNI
// Each float kind of weight: load(n, k) gives STEP weights of channel n from column k as a vector
// operand, madd(x, w, sums) adds their products with x's (Input, as load_x reads it) to LANES float32
// sums, at(n, k) gives one weight (the columns past the last full step); every kind's rows are
// asked for ahead of use (prefetch_row, in linear). Float32 and bfloat16 weights are converted
// to float32 vectors and meet x in float32 (the caller rounds x to bfloat16 for bfloat16 weights).
struct FloatProducts {
    typedef float Input;
    typedef vec Operand;
    static constexpr int64_t STEP = LANES;
    static vec load_x(const float* x) { return vload(x); }
    static vec madd(vec x, vec w, vec sums) { return vfma(x, w, sums); }
    static float input(float x) { return x; }
    static constexpr bool one_row_in_one_stream = false;  // see linear's one-row path
};

struct Float32Weight : FloatProducts {
    const float* w; int64_t K;
    vec load(int64_t n, int64_t k) const { return vload(w + n * K + k); }
    float at(int64_t n, int64_t k) const { return w[n * K + k]; }
};

static inline float bfloat16_value(uint16_t b) {
    const uint32_t bits = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

struct BFloat16Weight : FloatProducts {
    const uint16_t* w; int64_t K;
    vec load(int64_t n, int64_t k) const { return vload_bf16(w + n * K + k); }
    float at(int64_t n, int64_t k) const { return bfloat16_value(w[n * K + k]); }
};

// Columns [k0, k1) of R rows x C channels, added to the vector sums acc[r][c] (kept in memory between
// blocks of columns: the order of the additions is the same as in one sweep).
template <int R, int C, class Weight>
static inline void tile(const Weight& wt, const typename Weight::Input* x, int64_t K, int64_t k0, int64_t k1,
                        int64_t n0, vec (*sums)[CHANNELS]) {
    vec acc[R][C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = sums[r][c];
    for (int64_t k = k0; k < k1; k += Weight::STEP) {
        typename Weight::Operand xv[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) xv[r] = Weight::load_x(x + r * K + k);
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) {
            const typename Weight::Operand w = wt.load(n0 + c, k);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][c] = Weight::madd(xv[r], w, acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) sums[r][c] = acc[r][c];
}

template <int R, class Weight>
static inline void tile_channels(const Weight& wt, const typename Weight::Input* x, int64_t K, int64_t k0, int64_t k1, int64_t n0,
                                 int channels, vec (*sums)[CHANNELS]) {
    switch (channels) {
        case 4: tile<R, 4>(wt, x, K, k0, k1, n0, sums); break;
        case 3: tile<R, 3>(wt, x, K, k0, k1, n0, sums); break;
        case 2: tile<R, 2>(wt, x, K, k0, k1, n0, sums); break;
        default: tile<R, 1>(wt, x, K, k0, k1, n0, sums); break;
    }
}

// Blocks of ROW_BLOCK rows and of columns: a block of CHANNELS weight rows and the rows' columns stay
// in the L1 / L2 cache while every row tile passes over them. Each tile's sums are stored and loaded
// again between blocks, and its weight rows asked for ahead at a block's start (prefetch_row). With a
// step's few rows the weights come from memory and 1 KB of each weight row a block keeps those asks
// in small bursts (4 KB: a 2-core AMD EPYC read bfloat16 from memory at 7 rows 15-20% slower); a
// prompt's rows are bound by arithmetic, and 4 KB spends less of it on the sums (bfloat16, 134 rows,
// from memory: 1 KB 130 / 255, 512 bytes 108 / 222, 4 KB 149 / 301 GFLOP/s on one / two threads).
static inline int64_t column_block_bytes(int64_t M) { return M > ROW_BLOCK ? 4096 : 1024; }

template <RowsAhead where, class Weight>
static void linear(const Weight& wt, const typename Weight::Input* x, int64_t M, int64_t K, int64_t N, float* y) {
    static_assert(CHANNELS == 4, "tile_channels covers 1 to 4 channels");
    const int64_t full = K - K % Weight::STEP, columns = column_block_bytes(M) / int64_t(sizeof(*wt.w));
    static_assert(1024 / sizeof(*wt.w) % Weight::STEP == 0, "a block of columns holds whole steps");
    auto add = [&](int64_t n0, int channels, int64_t m0, int64_t rows, vec (*sums)[CHANNELS]) {
        const typename Weight::Input* xb = x + m0 * K;
        // One row against weight rows of at most 8 KB: one channel after the other, whole, with no
        // prefetch, so that memory sees a single sequential stream. On a 2-core AMD EPYC (Zen 4) that
        // stream outran the four interleaved channels with their prefetches: bfloat16 16384 x 2048,
        // one / two threads 22 / 40 -> 25-28 / 43-50 GB/s, the 128256-channel head 19 / 28 -> 26 / 32,
        // 14336 x 4096 18.5 / 30.8 -> 20.2 / 32.1. Longer rows lose (4096 x 8192 on two threads
        // 33 -> 26) and so do 3 or more rows; float32 gained nothing, so only the bfloat16 dot
        // products take it, and only where rows are asked for into L2 (AMD with AVX-512): a 2-core
        // Xeon (AVX-512 BF16, AMX) read model (a)'s 21 weights in turn faster with the walk and its
        // asks into L1, one / two threads 14.4 / 27.3 -> 14.8 / 28.9 GB/s. The sums add in the same order.
        if (where == INTO_L2 && Weight::one_row_in_one_stream && M == 1 && K * int64_t(sizeof(*wt.w)) <= 8192) {
            for (int c = 0; c < channels; c++)  // channel c alone: a tile of one row and one channel, its sum sums[0][c]
                tile<1, 1>(wt, xb, K, 0, full, n0 + c, reinterpret_cast<vec (*)[CHANNELS]>(&sums[0][c]));
            return;
        }
        for (int64_t k0 = 0; k0 < full; k0 += columns) {
            const int64_t k1 = std::min(full, k0 + columns);
            // Asking for the rows ahead paid on a 2-core Xeon: float32 at 7 rows 18.6-19.8 -> 20.0-20.8 GB/s
            // on two threads, 9.3-9.5 -> 10.4-10.6 on one (one row unchanged); bfloat16 (converted to
            // float32), two threads, M = 1 / 7: 23.0 / 16.9 -> 24.2 / 18.5
            for (int c = 0; c < channels; c++) prefetch_row<where>(wt.w + (n0 + c) * K, k0, K, (k1 - k0) * sizeof(*wt.w));
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
    over_tiles<CHANNELS, CHANNELS>(M, N, add, [&](int64_t m, int64_t n0, int channels, const vec* sums) {
        for (int64_t n = n0; n < n0 + channels; n++) {
            float s = vsum(sums[n - n0]);
            for (int64_t k = full; k < K; k++) s = std::fma(Weight::input(x[m * K + k]), wt.at(n, k), s);
            y[m * N + n] = s;
        }
    });
}

// linear with the weight rows asked for ahead as this CPU reads them fastest (rows_ahead)
template <class Weight>
static void linear_on_this_cpu(const Weight& wt, const typename Weight::Input* x, int64_t M, int64_t K, int64_t N, float* y) {
    switch (rows_ahead) {
        case INTO_L2: return linear<INTO_L2>(wt, x, M, K, N, y);
        case NOT_ASKED: return linear<NOT_ASKED>(wt, x, M, K, N, y);
        default: return linear<INTO_L1>(wt, x, M, K, N, y);
    }
}

#if BF16
// bfloat16 weights with AVX-512's bfloat16 dot products: x rounded to bfloat16 once per product, one
// instruction multiplies 32 columns of a channel with a row's, each product exact, and adds them in
// pairs to 16 float32 sums - no conversion of the weights, a quarter of the float path's instructions.
struct BFloat16Pairs {
    typedef uint16_t Input;
    typedef __m512bh Operand;
    static constexpr int64_t STEP = 32;
    static constexpr bool one_row_in_one_stream = true;
    const uint16_t* w; int64_t K;
    Operand load(int64_t n, int64_t k) const { return (__m512bh)_mm512_loadu_si512(w + n * K + k); }
    float at(int64_t n, int64_t k) const { return bfloat16_value(w[n * K + k]); }
    static Operand load_x(const uint16_t* x) { return (__m512bh)_mm512_loadu_si512(x); }
    static vec madd(Operand x, Operand w, vec sums) { return _mm512_dpbf16_ps(sums, x, w); }
    static float input(uint16_t x) { return bfloat16_value(x); }
};

// AMX's bfloat16 tiles: a tile product (tdpbf16ps) multiplies 16 channels' 32 columns, read as the
// weight holds them (a tile row per channel), with up to 16 rows of x laid out in pairs of columns,
// and adds them to 16 x 16 float32 sums that stay in a tile over all of K. Each sum adds its 32
// products in the instruction's one order, block of columns after block, whatever rows share the
// tile, so a row gets the same bits at any row count; x's missing rows and columns are zeros. It
// costs about what one row costs until many rows: 8192 x 2048 from memory on a 2-core Xeon, one
// thread, M = 1 / 7 / 16 / 64, GB/s: the dot products 13.4 / 8.9 / 4.9 / 1.4, the tiles 13.9 / 13.1 /
// 12.9 / 7.7. Tiles 0-1: two tiles of channels, 2-3: two of rows, 4-7: their four products' sums.
// One block of 32 columns: channel tiles a[0 .. A) (rows `stride` bytes apart) times row tiles x[0 ..
// X), added to tiles 4 + 2 * h + c.
template <int A, int X>
static inline void bfloat16_block(const uint16_t* a0, const uint16_t* a1, int64_t stride, const uint16_t* x0,
                                  const uint16_t* x1) {
    _tile_loadd(0, a0, stride);
    if (A > 1) _tile_loadd(1, a1, stride);
    _tile_loadd(2, x0, 64);
    _tile_dpbf16ps(4, 0, 2);
    if (A > 1) _tile_dpbf16ps(5, 1, 2);
    if (X > 1) {
        _tile_loadd(3, x1, 64);
        _tile_dpbf16ps(6, 0, 3);
        if (A > 1) _tile_dpbf16ps(7, 1, 3);
    }
}

// The sums of channel tiles a[0 .. A) (each 16 rows of `stride` columns; `tail`: the last, partial
// block of 32 columns, zero-padded, 16 x 32) with row tiles x[0 .. X) (pairs laid out per block of
// 32 columns, 512 values each) over `blocks` whole blocks, into tiles 4 + 2 * h + c.
template <int A, int X>
static inline void bfloat16_tiles(const uint16_t* const* a, const uint16_t* const* tail, int64_t stride,
                                  const uint16_t* const* x, int64_t blocks) {
    _tile_zero(4); if (A > 1) _tile_zero(5);
    if (X > 1) { _tile_zero(6); if (A > 1) _tile_zero(7); }
    const int64_t ahead = PREFETCH / 2 / int64_t(sizeof(uint16_t));  // columns ahead in each channel's row
    for (int64_t b = 0; b < blocks; b++) {
        for (int c = 0; c < A; c++) {
            const int64_t at = b * 32 + ahead;  // past the row's end: the same column of the next 16 rows
            const uint16_t* p = at < stride ? a[c] + at : a[c] + 16 * A * stride + (at - stride);
            for (int r = 0; r < 16; r++) _mm_prefetch(reinterpret_cast<const char*>(p + r * stride), _MM_HINT_T0);
        }
        bfloat16_block<A, X>(a[0] + b * 32, a[1] + b * 32, stride * 2, x[0] + b * 512, x[1] + b * 512);
    }
    if (tail[0]) bfloat16_block<A, X>(tail[0], tail[1], 64, x[0] + blocks * 512, x[1] + blocks * 512);
}

// x (M, K) bfloat16 against weight (N, K) on the tiles; threads take 32 channels at a time.
static void bfloat16_amx(const uint16_t* x, const uint16_t* w, int64_t M, int64_t K, int64_t N, float* y) {
    const int64_t blocks = K / 32, padded_blocks = (K + 31) / 32, row_tiles = (M + 15) / 16;
    // per 16 rows and 32 columns: [pair][row][2], a pair of columns as one 32-bit value
    std::vector<uint32_t> pairs(row_tiles * padded_blocks * 256, 0);
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; m++) {
            uint32_t* row = pairs.data() + m / 16 * padded_blocks * 256 + m % 16;
            const uint16_t* xm = x + m * K;
            for (int64_t k = 0; k + 1 < K; k += 2) {
                uint32_t pair;
                std::memcpy(&pair, xm + k, 4);
                row[k / 32 * 256 + k % 32 / 2 * 16] = pair;
            }
            if (K % 2) row[(K - 1) / 32 * 256 + (K - 1) % 32 / 2 * 16] = xm[K - 1];  // the last column's pair: (x, 0)
        }
    });
    at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t begin, int64_t end) {
        AmxTiles tiles([](int) { return 16; }, [](int) { return 64; });
        alignas(64) float sums[4][16][16];
        alignas(64) uint16_t tails[2][16][32];
        std::vector<uint16_t> missing;  // a last tile of fewer than 16 channels, padded with zero rows
        for (int64_t u = begin; u < end; u++) {
            const int64_t n0 = u * 32;
            const int A = N - n0 > 16 ? 2 : 1;
            const uint16_t* a[2] = {w + n0 * K, w + (n0 + 16) * K};
            for (int c = 0; c < A; c++) {
                const int64_t channels = std::min<int64_t>(16, N - n0 - 16 * c);
                if (channels < 16) {
                    missing.assign(16 * K, 0);
                    std::memcpy(missing.data(), a[c], channels * K * sizeof(uint16_t));
                    a[c] = missing.data();
                }
            }
            const uint16_t* tail[2] = {nullptr, nullptr};
            if (K % 32)
                for (int c = 0; c < A; c++) {
                    std::memset(tails[c], 0, sizeof(tails[c]));
                    for (int r = 0; r < 16; r++) std::memcpy(tails[c][r], a[c] + r * K + blocks * 32, (K % 32) * sizeof(uint16_t));
                    tail[c] = &tails[c][0][0];
                }
            for (int64_t t = 0; t < row_tiles; t += 2) {
                const uint16_t* xt[2] = {reinterpret_cast<const uint16_t*>(pairs.data() + t * padded_blocks * 256),
                                         reinterpret_cast<const uint16_t*>(pairs.data() + (t + 1) * padded_blocks * 256)};
                const int X = t + 1 < row_tiles ? 2 : 1;
                if (A == 2 && X == 2) bfloat16_tiles<2, 2>(a, tail, K, xt, blocks);
                else if (A == 2) bfloat16_tiles<2, 1>(a, tail, K, xt, blocks);
                else if (X == 2) bfloat16_tiles<1, 2>(a, tail, K, xt, blocks);
                else bfloat16_tiles<1, 1>(a, tail, K, xt, blocks);
                _tile_stored(4, sums[0], 64); _tile_stored(5, sums[1], 64);
                _tile_stored(6, sums[2], 64); _tile_stored(7, sums[3], 64);
                for (int h = 0; h < X; h++)
                    for (int64_t m = (t + h) * 16; m < std::min(M, (t + h + 1) * 16); m++)
                        for (int64_t n = n0; n < std::min(N, n0 + 32); n++)
                            y[m * N + n] = sums[2 * h + (n - n0) / 16][(n - n0) % 16][m % 16];
            }
        }
    });
}

// `amx`: AMX's bfloat16 tiles may be used.
static void run_bfloat16(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, bool amx) {
    const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
    const at::Tensor rounded = x.to(at::kBFloat16);
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(rounded.data_ptr());
    const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
    float* yp = y.data_ptr<float>();
    if (amx) return bfloat16_amx(xp, w, M, K, N, yp);
    const BFloat16Pairs wt{w, K};
    linear_on_this_cpu(wt, xp, M, K, N, yp);
}
#endif  // BF16

#endif  // !VNNI
#if !BF16

// int8 and int4 weights against 8-bit activations, with integer dot products as llama.cpp computes
// them: each row of x is quantized once per product, in blocks of 32 columns with a scale each
// (d = max |x| / 127, q = round(x / d)); a block adds d * sum(code * q) times the channel's scale
// (int8), and a group of columns d * scale * sum(code * q) + shifted zero * sum(x) (int4). The
// integer sums are exact and each (row, channel) adds its floats in one order, so a row's result
// still does not depend on the rows beside it.
//
// Row r's columns go to q[r * width ...] (width: K padded to a multiple of 32, the columns past K
// quantized as 0), and each block's d to d[(r * width + b) / 32]; where given, each block's sum of
// its columns of x to xsum (int4), of its codes to qsum (int8), at the same index.
static void quantize_activations(const float* x, int64_t M, int64_t K, int64_t width, int8_t* q, float* d,
                                 float* xsum, int32_t* qsum) {
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; r++)
            for (int64_t b = 0; b < width; b += 32) {
                const float* xb = x + r * K + b;
                float tail[32];
                if (b + 32 > K) {  // the last block, partly past K
                    std::fill(tail, tail + 32, 0.f);
                    std::copy(xb, x + (r + 1) * K, tail);
                    xb = tail;
                }
                vec v[32 / LANES], most = vzero();
                for (int i = 0; i < 32 / LANES; i++) {
                    v[i] = vload(xb + i * LANES);
                    most = vmax(most, vabs(v[i]));
                }
                const float amax = vmax_all(most), inverse = amax > 0.f ? 127.f / amax : 0.f;
                for (int i = 0; i < 32 / LANES; i++) vstore_rounded(q + r * width + b + i * LANES, vmul(v[i], vset1(inverse)));
                d[(r * width + b) / 32] = amax / 127.f;
                if (qsum) {
                    int32_t total = 0;
                    for (int j = 0; j < 32; j++) total += q[r * width + b + j];
                    qsum[(r * width + b) / 32] = total;
                }
                if (!xsum) continue;
                vec sum = v[0];
                for (int i = 1; i < 32 / LANES; i++) sum = vadd(sum, v[i]);
                xsum[(r * width + b) / 32] = vsum(sum);
            }
    });
}

// int4: the weights are packed at load (cpu_kernels.pack_int4) so that a thread reads one stream of
// memory: per tile of TILE_CHANNELS = 16 channels and per block of BLOCK columns, the codes of the
// block's spans of SPAN = 32 columns (256 bytes each), then the tile's (scale, shifted zero) pairs
// in float16 (16 scales, then 16 zeros) for each of the block's max(1, BLOCK / group) groups - or,
// for symmetric codes (every zero 0), the 16 scales alone: the packed width tells which.
// Reading tiles of separate rows of codes and scales (8 streams a core) ran at half the rate of one
// stream here.
//
// A span's bytes are 4 rows of 64: byte 4c + j of row r holds channel c's columns 4r + j (low
// nibble) and 16 + 4r + j (high nibble). Its two nibble halves are thus 8 rows of 16 channels x 4
// columns: the layout of a dot product whose lane c sums 4 columns of channel c, and of the weight
// operand of AMX's tile product. So a lane sums one channel over a span exactly, in integers, and the
// activations, quantized per span (one d and one sum of x each), are read in place. Each (row,
// channel) adds d * scale * sum(code * q) + shifted zero * sum(x) once per span, in the order of the
// spans, whichever path computes the integer sums; with symmetric codes, W = (code - 8) * scale,
// d * scale * (sum(code * q) - 8 * sum(q)), the 8 taken off in integers (sum(q): one per span of x).
constexpr int64_t SPAN = 32, SPAN_BYTES = TILE_CHANNELS * SPAN / 2;
constexpr int SPANS = BLOCK / SPAN, TILE_VECS = TILE_CHANNELS / LANES;

struct Int4Product {
    const uint8_t* w; int64_t blocks, block_bytes, spans;  // spans: K / SPAN
    int pair[SPANS];  // span s of a block: its group's pair among the block's
    const int8_t* q; const float* d;  // the activations: q (M, K), d (M, spans)
    const float* xsum; const int32_t* qsum;  // (M, spans): sums of x (asymmetric), of q (symmetric codes)
};

// One span of one tile: its 8 rows of codes for channels [h * LANES, (h + 1) * LANES) of the tile.
static inline void span_codes(const uint8_t* span, int h, ivec* w) {
    for (int r = 0; r < 4; r++) {
        const ivec bytes = iload(span + r * 4 * TILE_CHANNELS + h * 4 * LANES);
        w[r] = nibbles(bytes, 0);
        w[r + 4] = nibbles(bytes, 4);
    }
}

// A row's sums of LANES channels after the span `at` = row * spans + span, whose integer sums are
// `dot`, with those channels' scale and shifted zero of the span's group (SYMMETRIC: no zero).
template <bool SYMMETRIC>
static inline vec add_span(vec sum, ivec dot, const Int4Product& p, int64_t at, vec scale, vec zero) {
    if (SYMMETRIC) return vfma(vmul(vcvt(minus(dot, 8 * p.qsum[at])), vset1(p.d[at])), scale, sum);
    return vfma(vmul(vcvt(dot), vset1(p.d[at])), scale, vfma(zero, vset1(p.xsum[at]), sum));
}

// The scales of a span's group for channels h * LANES onwards, and their shifted zeros (0 if SYMMETRIC).
template <bool SYMMETRIC>
static inline void group_pair(const uint8_t* block, int pair, int h, vec& scale, vec& zero) {
    const uint16_t* halves = reinterpret_cast<const uint16_t*>(block + SPANS * SPAN_BYTES) +
                             pair * (SYMMETRIC ? 1 : 2) * TILE_CHANNELS + h * LANES;
    scale = vload_halves(halves);
    zero = SYMMETRIC ? vzero() : vload_halves(halves + TILE_CHANNELS);
}

// Tile t (channels from t * TILE_CHANNELS) against rows [m0, m0 + rows): each span's codes are
// unpacked once for all the rows. A tile's channels past N are zeros; their sums are not written.
template <bool SYMMETRIC>
static inline void int4_tile(const Int4Product& p, int64_t t, int64_t m0, int64_t rows, vec (*sums)[TILE_VECS]) {
    const uint8_t* block = p.w + t * p.blocks * p.block_bytes;
    for (int64_t b = 0; b < p.blocks; b++, block += p.block_bytes) {
        // Into L2, not L1: on a 2-core Xeon (AVX-512 VNNI) 17 -> 20-21 GB/s from memory at M = 1 on two
        // threads, 9 -> 10.5 on one
        prefetch<_MM_HINT_T1>(block + PREFETCH, p.block_bytes);
        const int spans = int(std::min<int64_t>(SPANS, p.spans - b * SPANS));
        for (int s = 0; s < spans; s++)
            for (int h = 0; h < TILE_VECS; h++) {
                ivec w[8];
                span_codes(block + s * SPAN_BYTES, h, w);
                vec scale, zero;
                group_pair<SYMMETRIC>(block, p.pair[s], h, scale, zero);
                for (int64_t r = 0; r < rows; r++) {
                    const int64_t at = (m0 + r) * p.spans + b * SPANS + s;
                    sums[r][h] = add_span<SYMMETRIC>(sums[r][h], span_dot(w, p.q + at * SPAN), p, at, scale, zero);
                }
            }
    }
}

#if VNNI
// AMX: each span's integer sums for R rows x the tile's 16 channels in one tile product (tdpbsud: x's
// bytes signed, the codes unsigned), the same integers as span_dot's, then the same float steps per
// row: a row gets the same bits from either path. R = 8 or 16 rows (amx_rows), x padded with zero
// rows to a multiple of R; a tile of rows keeps its sums in registers over all of K. Tiles 0-3: a
// block's 4 spans' sums, 4-5: x, 6-7: the codes, unpacked to memory (the tiles load from there).
//
// A tile product costs the same whatever its rows, and each span needs one of its own (its sums are
// scaled apart), so below AMX_ROWS rows the vector path is as fast or faster: 4096 x 2048 in cache on
// a 2-core Xeon, one thread, G weights/s, tiles / vectors: 19.7 / 27.4 at 2 rows, 19.4 / 21.1 at 4,
// 14.9 / 14.7 at 7, 14.9 / 13.2 at 8, 10.8 / 7.2 at 16, 2.8 / 1.9 at 64.
constexpr int64_t AMX_ROWS = 5;
static inline int64_t amx_rows(int64_t M) { return M <= 8 ? 8 : 16; }

struct Int4Tiles : AmxTiles {
    explicit Int4Tiles(int64_t M)
        : AmxTiles([M](int i) { return i < 6 ? amx_rows(M) : 8; },
                   [](int i) { return i == 4 || i == 5 ? SPAN : 64; }) {}
};

// Rows [m0, m0 + R) of tile t, over all of K; their sums added to sums[0 .. rows).
template <int R, bool SYMMETRIC>
static inline void int4_rows_amx(const Int4Product& p, int64_t t, int64_t m0, int64_t rows, vec (*sums)[TILE_VECS]) {
    alignas(64) uint8_t codes[SPANS][8][64];
    alignas(64) int32_t dots[SPANS][R][16];
    vec acc[R];
    for (int r = 0; r < R; r++) acc[r] = vzero();
    const int64_t K = p.spans * SPAN;
    const uint8_t* block = p.w + t * p.blocks * p.block_bytes;
    for (int64_t b = 0; b < p.blocks; b++, block += p.block_bytes) {
        prefetch<_MM_HINT_T1>(block + PREFETCH, p.block_bytes);
        const int spans = int(std::min<int64_t>(SPANS, p.spans - b * SPANS));
        for (int s = 0; s < spans; s++) {
            ivec w[8];
            span_codes(block + s * SPAN_BYTES, 0, w);
            for (int r = 0; r < 8; r++) _mm512_store_si512(codes[s][r], w[r]);
        }
        const int8_t* x = p.q + m0 * K + b * BLOCK;
#define SPAN_PRODUCT(S, X, W)                  \
    if (S < spans) {                           \
        _tile_zero(S);                         \
        _tile_loadd(X, x + S * SPAN, K);       \
        _tile_loadd(W, codes[S], 64);          \
        _tile_dpbsud(S, X, W);                 \
        _tile_stored(S, dots[S], 64);          \
    }
        SPAN_PRODUCT(0, 4, 6) SPAN_PRODUCT(1, 5, 7) SPAN_PRODUCT(2, 4, 6) SPAN_PRODUCT(3, 5, 7)
#undef SPAN_PRODUCT
        for (int s = 0; s < spans; s++) {
            vec scale, zero;
            group_pair<SYMMETRIC>(block, p.pair[s], 0, scale, zero);
#pragma GCC unroll 16
            for (int r = 0; r < R; r++)
                acc[r] = add_span<SYMMETRIC>(acc[r], _mm512_load_si512(dots[s][r]), p, (m0 + r) * p.spans + b * SPANS + s,
                                             scale, zero);
        }
    }
    for (int r = 0; r < rows; r++) sums[r][0] = acc[r];
}

template <bool SYMMETRIC>
static inline void int4_tile_amx(const Int4Product& p, int64_t t, int64_t m0, int64_t rows, int64_t R, vec (*sums)[TILE_VECS]) {
    for (int64_t r0 = 0; r0 < rows; r0 += R) {
        const int64_t n = std::min(R, rows - r0);
        if (R == 8) int4_rows_amx<8, SYMMETRIC>(p, t, m0 + r0, n, sums + r0);
        else int4_rows_amx<16, SYMMETRIC>(p, t, m0 + r0, n, sums + r0);
    }
}
#endif

// x (M, K) float32 against the packed weight of N channels (pack_int4); `amx`: the tiles may be used.
static void run_int4(const at::Tensor& x, const at::Tensor& weight, int64_t group, at::Tensor& y, bool amx = false) {
    const int64_t M = x.size(0), K = x.size(1), N = y.size(1), blocks = (K + BLOCK - 1) / BLOCK;
    const int64_t pairs = std::max<int64_t>(1, BLOCK / group), spans = K / SPAN;
    const bool symmetric = weight.size(1) == int4_channel_bytes(K, group, true);  // scales only (the op checked the width)
#if VNNI
    amx = amx && M >= AMX_ROWS;
    const int64_t R = amx ? amx_rows(M) : 1;
#else
    const int64_t R = 1;
#endif
    const int64_t padded = (M + R - 1) / R * R;  // rows of x that whole tiles of R rows read: zeros past M
    at::Tensor q = at::empty({padded * K}, x.options().dtype(at::kChar));
    at::Tensor d = at::empty({2, padded * spans}, x.options());
    if (padded > M) {  // rows past M, which AMX's tiles read: zeros (zeroing all of q and d took 2% of the late
                       // layers' pass of a 16-layer 1B model, one row or 7)
        q.narrow(0, M * K, (padded - M) * K).zero_();
        d.narrow(1, M * spans, (padded - M) * spans).zero_();
    }
    // d's second row: the spans' sums of x, or of q for symmetric codes (int32, as many bytes)
    float* xsum = symmetric ? nullptr : d.data_ptr<float>() + padded * spans;
    int32_t* qsum = symmetric ? reinterpret_cast<int32_t*>(d.data_ptr<float>() + padded * spans) : nullptr;
    Int4Product p{weight.data_ptr<uint8_t>(), blocks, TILE_CHANNELS * weight.size(1) / blocks, spans, {},
                  q.data_ptr<int8_t>(), d.data_ptr<float>(), xsum, qsum};
    for (int s = 0; s < SPANS; s++) p.pair[s] = group <= BLOCK ? int(s * SPAN / group) : 0;
    quantize_activations(x.data_ptr<float>(), M, K, K, q.data_ptr<int8_t>(), d.data_ptr<float>(), xsum, qsum);
    float* yp = y.data_ptr<float>();
    auto finish = [&](int64_t m, int64_t n0, int channels, const vec* sums) {
        if (channels == TILE_CHANNELS) {
            for (int h = 0; h < TILE_VECS; h++) vstore(yp + m * N + n0 + h * LANES, sums[h]);
            return;
        }
        float all[TILE_CHANNELS];
        for (int h = 0; h < TILE_VECS; h++) vstore(all + h * LANES, sums[h]);
        std::copy(all, all + channels, yp + m * N + n0);
    };
#if VNNI
    if (amx) {
        auto add = [&](int64_t n0, int, int64_t m0, int64_t rows, vec (*sums)[TILE_VECS]) {
            if (symmetric) int4_tile_amx<true>(p, n0 / TILE_CHANNELS, m0, rows, R, sums);
            else int4_tile_amx<false>(p, n0 / TILE_CHANNELS, m0, rows, R, sums);
        };
        over_tiles<TILE_CHANNELS, TILE_VECS, Int4Tiles>(M, N, add, finish);
        return;
    }
#endif
    auto add = [&](int64_t n0, int, int64_t m0, int64_t rows, vec (*sums)[TILE_VECS]) {
        if (symmetric) int4_tile<true>(p, n0 / TILE_CHANNELS, m0, rows, sums);
        else int4_tile<false>(p, n0 / TILE_CHANNELS, m0, rows, sums);
    };
    over_tiles<TILE_CHANNELS, TILE_VECS>(M, N, add, finish);
}

// int8: the codes packed at load (cpu_kernels.pack_int8) into int4's tiles and spans, one stream of
// memory: per tile of 16 channels and block of BLOCK columns, the block's spans of 32 columns, each
// 8 rows of 64 bytes, byte 4c + j of row i holding channel c's column 4i + j as code + 128 (unsigned,
// as the dot products take their first operand; the columns past K code 0). A span's integer sum for
// a row is then sum((code + 128) * q) - 128 * sum(q), exact, a lane per channel: no sums across
// lanes, and a byte of weights costs a quarter of the instructions it cost read as (N, K) rows. Each
// (row, channel) adds d * that once per span, in the order of the spans, and multiplies by the
// channel's scale at the end.
constexpr int64_t INT8_SPAN_BYTES = TILE_CHANNELS * SPAN, INT8_BLOCK_BYTES = SPANS * INT8_SPAN_BYTES;

struct Int8Product {
    const uint8_t* w; int64_t blocks, spans;  // spans: K / SPAN, rounded up
    const int8_t* q; const float* d; const int32_t* qsum;  // the activations: q (M, spans * SPAN), d and qsum (M, spans)
};

// Tile t (channels from t * TILE_CHANNELS) against rows [m0, m0 + rows): each span's codes are loaded
// once for all the rows. A tile's channels past N are zeros; their sums are not written.
static inline void int8_tile(const Int8Product& p, int64_t t, int64_t m0, int64_t rows, vec (*sums)[TILE_VECS]) {
    const uint8_t* block = p.w + t * p.blocks * INT8_BLOCK_BYTES;
    for (int64_t b = 0; b < p.blocks; b++, block += INT8_BLOCK_BYTES) {
        // 16 KB ahead, into L2: on a 2-core AMD EPYC, 8192 x 2048 from memory at M = 1, GB/s median of 5
        // interleaved runs, two threads / one: 26.7 / 15.4 at 4 KB ahead, 26.3 / 17.1 at 8, 28.7 / 17.8 at 16
        prefetch<_MM_HINT_T1>(block + 4 * PREFETCH, INT8_BLOCK_BYTES);
        const int spans = int(std::min<int64_t>(SPANS, p.spans - b * SPANS));
        for (int s = 0; s < spans; s++)
            for (int h = 0; h < TILE_VECS; h++) {
                ivec w[8];
                for (int i = 0; i < 8; i++) w[i] = iload(block + s * INT8_SPAN_BYTES + i * 4 * TILE_CHANNELS + h * 4 * LANES);
#if !VNNI  // maddubs' int16 pairs hold codes up to 15 (span_dot): a byte is 16 x its high nibble + its low one
                ivec high[8];
                for (int i = 0; i < 8; i++) {
                    high[i] = nibbles(w[i], 4);
                    w[i] = nibbles(w[i], 0);
                }
#endif
                for (int64_t r = 0; r < rows; r++) {
                    const int64_t at = (m0 + r) * p.spans + b * SPANS + s;
#if VNNI
                    const ivec dot = span_dot(w, p.q + at * SPAN);
#else
                    const ivec dot = sixteen_times_plus(span_dot(high, p.q + at * SPAN), span_dot(w, p.q + at * SPAN));
#endif
                    sums[r][h] = vfma(vcvt(minus(dot, 128 * p.qsum[at])), vset1(p.d[at]), sums[r][h]);
                }
            }
    }
}

// x (M, K) float32 against int8 codes packed by pack_int8 with scales (N,): W = codes * scales.
static void run_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, at::Tensor& y) {
    const int64_t M = x.size(0), K = x.size(1), N = y.size(1), spans = (K + SPAN - 1) / SPAN;
    at::Tensor q = at::empty({M * spans * SPAN}, x.options().dtype(at::kChar));
    at::Tensor d = at::empty({M * spans}, x.options());
    at::Tensor qsum = at::empty({M * spans}, x.options().dtype(at::kInt));
    quantize_activations(x.data_ptr<float>(), M, K, spans * SPAN, q.data_ptr<int8_t>(), d.data_ptr<float>(), nullptr,
                         qsum.data_ptr<int32_t>());
    const Int8Product p{weight.data_ptr<uint8_t>(), (K + BLOCK - 1) / BLOCK, spans, q.data_ptr<int8_t>(),
                        d.data_ptr<float>(), qsum.data_ptr<int32_t>()};
    const float* channel_scales = scales.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    auto add = [&](int64_t n0, int, int64_t m0, int64_t rows, vec (*sums)[TILE_VECS]) {
        int8_tile(p, n0 / TILE_CHANNELS, m0, rows, sums);
    };
    over_tiles<TILE_CHANNELS, TILE_VECS>(M, N, add, [&](int64_t m, int64_t n0, int channels, const vec* sums) {
        float all[TILE_CHANNELS];
        for (int h = 0; h < TILE_VECS; h++) vstore(all + h * LANES, sums[h]);
        for (int c = 0; c < channels; c++) yp[m * N + n0 + c] = all[c] * channel_scales[n0 + c];
    });
}

#endif  // !BF16

#if !VNNI && !BF16

#if LANES == 8
// A prompt's float32, bfloat16 and int8 products on AVX2 (cpu_kernels.prompt_pass), in the layout of
// a matrix product rather than of dot products: a tile's 16 rows of x sit side by side in the lanes of
// two vectors, each weight is broadcast to a vector and multiplied with all 16, and a tile of
// PROMPT_TILE channels holds its 12 sums in registers. x, laid out in panels of 16 rows once per
// product, stays in L1 while a block of PROMPT_CHANNELS weight rows (in L2) passes over it; the dot
// products' tiles read 3 rows of x from L2 for every 4 channels and peaked at two thirds of a core's
// FMA rate (a 2-core AMD EPYC without AVX-512, 136 x 2048 by 8192 channels, one thread: 62-64 ->
// 77-83 GFLOP/s in a standalone harness, the FMA's peak 102). Each sum adds its products one column
// after the other, so a row's result does not depend on the rows beside it, nor on M (every prompt
// takes this path, whatever its length); it differs in its last bits from the steps' dot products,
// which sum in LANES chains.
constexpr int64_t PROMPT_ROWS = 2 * LANES, PROMPT_COLUMNS = 256, PROMPT_CHANNELS = 96;
constexpr int PROMPT_TILE = 6;  // 12 sums + 2 vectors of x + 1 broadcast weight of 16 registers

// Columns [0, columns) of C channels (rows `ldw` apart, from column 0 of w) against H vectors of a
// panel of x (PROMPT_ROWS values a column, from its column 0), added to the vector at sums[(c * H + h) * LANES].
template <int C, int H>
static inline void prompt_tile(const float* w, int64_t ldw, const float* panel, int64_t columns, float* sums) {
    vec acc[C][H];
    for (int c = 0; c < C; c++)
        for (int h = 0; h < H; h++) acc[c][h] = vload(sums + (c * H + h) * LANES);
    for (int64_t k = 0; k < columns; k++) {
        vec xv[H];
        for (int h = 0; h < H; h++) xv[h] = vload(panel + k * PROMPT_ROWS + h * LANES);
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) {
            const vec b = vset1(w[c * ldw + k]);
            for (int h = 0; h < H; h++) acc[c][h] = vfma(b, xv[h], acc[c][h]);
        }
    }
    for (int c = 0; c < C; c++)
        for (int h = 0; h < H; h++) vstore(sums + (c * H + h) * LANES, acc[c][h]);
}

template <int H>
static inline void prompt_tiles(const float* w, int64_t ldw, int channels, const float* panel, int64_t columns, float* sums) {
    for (int c = 0; c < channels; c += PROMPT_TILE, w += PROMPT_TILE * ldw, sums += PROMPT_TILE * H * LANES) {
        switch (std::min(PROMPT_TILE, channels - c)) {
            case 6: prompt_tile<6, H>(w, ldw, panel, columns, sums); break;
            case 5: prompt_tile<5, H>(w, ldw, panel, columns, sums); break;
            case 4: prompt_tile<4, H>(w, ldw, panel, columns, sums); break;
            case 3: prompt_tile<3, H>(w, ldw, panel, columns, sums); break;
            case 2: prompt_tile<2, H>(w, ldw, panel, columns, sums); break;
            default: prompt_tile<1, H>(w, ldw, panel, columns, sums); break;
        }
    }
}

// x (M, K) float32 against N weight rows: read(n0, channels, k0, columns, buffer, ldw) gives columns
// [k0, k0 + columns) of weight rows [n0, n0 + channels) as float32, rows ldw apart: the weight's own
// (float32) or written to `buffer`, which holds a block, PROMPT_COLUMNS apart (ldw as given). Each
// block is read once, then used by every panel of x. Row m's sum of channel n, times scales[n] where
// given, is y[m, n].
template <class Read>
static void prompt_linear(const float* x, int64_t M, int64_t K, int64_t N, const Read& read, const float* scales, float* y) {
    const int64_t panels = (M + PROMPT_ROWS - 1) / PROMPT_ROWS;
    auto vectors = [M](int64_t p) { return M - p * PROMPT_ROWS > LANES ? 2 : 1; };  // a last panel of LANES rows or fewer: one
    std::vector<float> xt(panels * K * PROMPT_ROWS, 0.f);  // panel p: [k][PROMPT_ROWS], rows past M zero
    at::parallel_for(0, M, PROMPT_ROWS, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; m++) {
            float* panel = xt.data() + m / PROMPT_ROWS * K * PROMPT_ROWS + m % PROMPT_ROWS;
            for (int64_t k = 0; k < K; k++) panel[k * PROMPT_ROWS] = x[m * K + k];
        }
    });
    at::parallel_for(0, (N + PROMPT_CHANNELS - 1) / PROMPT_CHANNELS, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> sums(panels * PROMPT_CHANNELS * PROMPT_ROWS);  // panel p: from (p * PROMPT_CHANNELS) * PROMPT_ROWS
        std::vector<float> buffer(PROMPT_CHANNELS * PROMPT_COLUMNS);
        for (int64_t b = begin; b < end; b++) {
            const int64_t n0 = b * PROMPT_CHANNELS;
            const int channels = int(std::min(PROMPT_CHANNELS, N - n0));
            std::fill(sums.begin(), sums.end(), 0.f);
            for (int64_t k0 = 0; k0 < K; k0 += PROMPT_COLUMNS) {
                const int64_t columns = std::min(PROMPT_COLUMNS, K - k0);
                int64_t ldw = PROMPT_COLUMNS;
                const float* wb = read(n0, channels, k0, columns, buffer.data(), ldw);
                for (int64_t p = 0; p < panels; p++) {
                    const float* panel = xt.data() + (p * K + k0) * PROMPT_ROWS;
                    float* s = sums.data() + p * PROMPT_CHANNELS * PROMPT_ROWS;
                    if (vectors(p) == 2) prompt_tiles<2>(wb, ldw, channels, panel, columns, s);
                    else prompt_tiles<1>(wb, ldw, channels, panel, columns, s);
                }
            }
            for (int64_t p = 0; p < panels; p++) {
                for (int c = 0; c < channels; c++) {  // channel c's vectors, as prompt_tiles lays them out
                    const float* lanes = sums.data() + p * PROMPT_CHANNELS * PROMPT_ROWS + c * vectors(p) * LANES;
                    const float scale = scales ? scales[n0 + c] : 1.f;  // times 1: the sum itself, exactly
                    for (int64_t m = p * PROMPT_ROWS; m < std::min(M, (p + 1) * PROMPT_ROWS); m++)
                        y[m * N + n0 + c] = lanes[m - p * PROMPT_ROWS] * scale;
                }
            }
        }
    });
}

// A prompt's product of float32, bfloat16 or int8 weights (the caller's test: cpu_kernels.prompt_pass).
// bfloat16 meets x rounded to bfloat16, as in run. int8 meets x as it is, not rounded to 8 bits (as a
// prompt's int8 layers on CUDA take cuBLAS's product of the cast weight): the codes as floats, whose
// sums are scaled once, per channel.
static void run_prompt(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, at::Tensor& y) {
    const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
    float* yp = y.data_ptr<float>();
    switch (weight.scalar_type()) {
        case at::kFloat: {
            const float* w = static_cast<const float*>(weight.data_ptr());
            auto read = [&](int64_t n0, int, int64_t k0, int64_t, float*, int64_t& ldw) { return ldw = K, w + n0 * K + k0; };
            return prompt_linear(x.data_ptr<float>(), M, K, N, read, nullptr, yp);
        }
        case at::kBFloat16: {
            const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
            auto read = [&](int64_t n0, int channels, int64_t k0, int64_t columns, float* buffer, int64_t&) {
                for (int c = 0; c < channels; c++) {
                    const uint16_t* row = w + (n0 + c) * K + k0;
                    float* out = buffer + c * PROMPT_COLUMNS;
                    int64_t k = 0;
                    for (; k + LANES <= columns; k += LANES) vstore(out + k, vload_bf16(row + k));
                    for (; k < columns; k++) out[k] = bfloat16_value(row[k]);
                }
                return static_cast<const float*>(buffer);
            };
            const at::Tensor rounded = x.to(at::kBFloat16).to(at::kFloat);
            return prompt_linear(rounded.data_ptr<float>(), M, K, N, read, nullptr, yp);
        }
        default: {  // int8 in pack_int8's layout: a block holds whole tiles of channels and blocks of columns
            static_assert(PROMPT_CHANNELS % TILE_CHANNELS == 0 && PROMPT_COLUMNS % BLOCK == 0, "whole packed blocks");
            const uint8_t* w = static_cast<const uint8_t*>(weight.data_ptr());
            const int64_t blocks = (K + BLOCK - 1) / BLOCK;
            auto read = [&](int64_t n0, int channels, int64_t k0, int64_t columns, float* buffer, int64_t&) {
                for (int64_t t = 0; t < (channels + TILE_CHANNELS - 1) / TILE_CHANNELS; t++)
                    for (int64_t kb = 0; kb < columns; kb += SPAN) {  // span kb of the block: 8 rows of 4 columns of 16 channels
                        const uint8_t* span = w + (((n0 / TILE_CHANNELS + t) * blocks + (k0 + kb) / BLOCK) * BLOCK +
                                                   (k0 + kb) % BLOCK) * TILE_CHANNELS;
                        for (int c = 0; c < TILE_CHANNELS; c++) {
                            alignas(32) uint8_t codes[SPAN];
                            for (int i = 0; i < 8; i++) std::memcpy(codes + 4 * i, span + 64 * i + 4 * c, 4);
                            float* out = buffer + (t * TILE_CHANNELS + c) * PROMPT_COLUMNS + kb;
                            for (int j = 0; j < SPAN; j += LANES) {  // code + 128 as a byte: the code
                                const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j));
                                vstore(out + j, vcvt(minus(_mm256_cvtepu8_epi32(bytes), 128)));
                            }
                        }
                    }
                return static_cast<const float*>(buffer);
            };
            return prompt_linear(x.data_ptr<float>(), M, K, N, read, scales.data_ptr<float>(), yp);
        }
    }
}
#endif  // LANES == 8

static void run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t group, at::Tensor& y) {
    const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
    float* yp = y.data_ptr<float>();
    const Float32Weight f32{{}, static_cast<const float*>(weight.data_ptr()), K};
    const BFloat16Weight bf16{{}, reinterpret_cast<const uint16_t*>(weight.data_ptr()), K};
    switch (weight.scalar_type()) {
        case at::kFloat: {
            const float* xp = x.data_ptr<float>();
            linear_on_this_cpu(f32, xp, M, K, N, yp);
            break;
        }
        case at::kBFloat16: {  // x rounded to bfloat16, as the dot-product path has it
            const at::Tensor rounded = x.to(at::kBFloat16).to(at::kFloat);
            const float* xp = rounded.data_ptr<float>();
            linear_on_this_cpu(bf16, xp, M, K, N, yp);
            break;
        }
        default: scales.defined() ? run_int8(x, weight, scales, y) : run_int4(x, weight, group, y);
    }
}

// Attention for decoding: each query's scores over its row's cache entries 0..position (only the
// filled part is read), a softmax and the sum of the values, each in one fixed order. What
// a query gets does not depend on how many queries, rows or cache entries come with it, so a verify
// pass over k + 1 positions, a batch and a longer cache give it what a lone query gets (PyTorch's
// attention blocks its sums by all three).
static inline vec load_as_float(const float* p) { return vload(p); }
static inline vec load_as_float(const c10::BFloat16* p) { return vload_bf16(reinterpret_cast<const uint16_t*>(p)); }

// exp(x) for x <= 0, each lane on its own (Cephes' expf: within 2 ulp; below -87, exp(-87) ~ 1.6e-38
// instead of smaller): 2^n * e^r, n = round(x / ln 2), |r| <= ln 2 / 2, e^r from a polynomial.
static inline vec vexp(vec x) {
    x = vmax(x, vset1(-87.f));
    const vec n = vround(vmul(x, vset1(1.44269504f)));
    vec r = vfma(n, vset1(-0.693359375f), x);  // ln 2 in two parts: the first exact in float
    r = vfma(n, vset1(2.12194440e-4f), r);
    vec p = vset1(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = vfma(p, r, vset1(c));
    return vtimes_pow2(vfma(vmul(p, r), r, vadd(r, vset1(1.f))), n);
}

constexpr int GROUP = 4;  // queries of one key head and position attended to at once (attend)

// Scores of keys [j, j + KEYS): KEYS x G chains of multiply-adds over the columns (one chain at a time
// left the core waiting on each), summed across lanes four at a time (vsum4: each sum as vsum has it),
// then the tail.
template <int G, int KEYS, class T>
static inline void scores(const float* query, const T* keys, int64_t D, int64_t S, int64_t j, float scale, float* weights) {
    static_assert(G * KEYS <= 4, "four chains at most");
    const int64_t full = D - D % LANES;
    vec acc[4] = {vzero(), vzero(), vzero(), vzero()};  // acc[u * G + g]: key j + u, query g
    for (int64_t d = 0; d < full; d += LANES)
#pragma GCC unroll 4
        for (int u = 0; u < KEYS; u++) {
            const vec key = load_as_float(keys + (j + u) * D + d);
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) acc[u * G + g] = vfma(vload(query + g * D + d), key, acc[u * G + g]);
        }
    float sums[4];
    vsum4(acc, sums);
    for (int u = 0; u < KEYS; u++)
        for (int g = 0; g < G; g++) {
            float s = sums[u * G + g];
            for (int64_t d = full; d < D; d++) s = std::fma(query[g * D + d], float(keys[(j + u) * D + d]), s);
            weights[g * S + j + u] = s * scale;
        }
}

// Columns [d0, d0 + C * LANES) of each query's weighted sum of the values, kept in registers over the keys.
template <int G, int C, class T>
static inline void weighted_values(const float* weights, const T* values, int64_t D, int64_t S, int64_t last, int64_t d0,
                                   float* sums) {
    vec acc[G][C];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) acc[g][c] = vzero();
    for (int64_t j = 0; j <= last; j++) {
        vec w[G];
        for (int g = 0; g < G; g++) w[g] = vset1(weights[g * S + j]);
        for (int c = 0; c < C; c++) {
            const vec value = load_as_float(values + j * D + d0 + c * LANES);
            for (int g = 0; g < G; g++) acc[g][c] = vfma(w[g], value, acc[g][c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) vstore(sums + g * D + d0 + c * LANES, acc[g][c]);
}

// G queries that share a key head and a position (grouped-query attention's group, up to GROUP at a
// time) against keys and values 0..last: each key and value is read once for all of them, and each
// query's sums run in the order they would alone. Scores go to weights[g * S + j] (S: L rounded up to
// whole vectors), the sums of the values weighted by the softmax's numerators to sums[g * D + d], their
// totals to totals[g].
template <int G, class T>
static void attend(const float* query, const T* keys, const T* values, int64_t D, int64_t S, int64_t last,
                   float* weights, float* sums, float* totals) {
    constexpr int KEYS = 4 / G;  // keys scored at once: four chains in all keep the core busy
    const float scale = 1.f / std::sqrt(float(D));
    int64_t j = 0;
    for (; j + KEYS <= last + 1; j += KEYS) scores<G, KEYS>(query, keys, D, S, j, scale, weights);
    for (; j <= last; j++) scores<G, 1>(query, keys, D, S, j, scale, weights);
    // The softmax's numerators LANES at a time (past `last`: computed, not summed), each query's total
    // summed lane by lane, then across the lanes
    for (int g = 0; g < G; g++) {
        float* w = weights + g * S;
        std::fill(w + last + 1, w + (last + LANES) / LANES * LANES, -INFINITY);
        vec highest = vset1(-INFINITY);
        for (j = 0; j <= last; j += LANES) highest = vmax(highest, vload(w + j));
        const float most = vmax_all(highest);
        vec total = vzero();
        for (j = 0; j <= last; j += LANES) {
            const vec e = vexp(vadd(vload(w + j), vset1(-most)));
            vstore(w + j, e);
            total = vadd(total, j + LANES <= last + 1 ? e : vkeep_first(e, int(last + 1 - j)));
        }
        totals[g] = vsum(total);
    }
    constexpr int C = LANES == 16 ? 4 : 2;  // vectors of columns a pass over the values keeps per query
    const int64_t full = D - D % LANES;
    int64_t d = 0;
    for (; d + C * LANES <= full; d += C * LANES) weighted_values<G, C>(weights, values, D, S, last, d, sums);
    for (; d < full; d += LANES) weighted_values<G, 1>(weights, values, D, S, last, d, sums);
    for (; d < D; d++)
        for (int g = 0; g < G; g++) {
            float s = 0.f;
            for (j = 0; j <= last; j++) s = std::fma(weights[g * S + j], float(values[j * D + d]), s);
            sums[g * D + d] = s;
        }
}

template <class T>
static void attention(const T* q, const T* k, const T* v, const int64_t* input_pos, T* out,
                      int64_t B, int64_t H, int64_t Q, int64_t D, int64_t KVH, int64_t L) {
    const int64_t per_key_head = H / KVH, groups = (per_key_head + GROUP - 1) / GROUP, S = (L + LANES - 1) / LANES * LANES;
    // one task: a row, a key head, a position and up to GROUP of the key head's queries there
    at::parallel_for(0, B * KVH * Q * groups, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> query(GROUP * D), weights(GROUP * S), sums(GROUP * D), totals(GROUP);
        for (int64_t task = begin; task < end; task++) {
            const int64_t g0 = task % groups * GROUP, t = task / groups % Q, kvh = task / (groups * Q) % KVH;
            const int64_t b = task / (groups * Q * KVH);
            const int n = int(std::min<int64_t>(GROUP, per_key_head - g0));
            const int64_t last = std::min(input_pos[b * Q + t], L - 1);
            const T* keys = k + (b * KVH + kvh) * L * D;
            const T* values = v + (b * KVH + kvh) * L * D;
            auto at = [&](int g) { return ((b * H + kvh * per_key_head + g0 + g) * Q + t) * D; };  // query g's row of q and out
            for (int g = 0; g < n; g++)
                for (int64_t d = 0; d < D; d++) query[g * D + d] = float(q[at(g) + d]);
            float* w = weights.data();
            switch (n) {
                case 4: attend<4>(query.data(), keys, values, D, S, last, w, sums.data(), totals.data()); break;
                case 3: attend<3>(query.data(), keys, values, D, S, last, w, sums.data(), totals.data()); break;
                case 2: attend<2>(query.data(), keys, values, D, S, last, w, sums.data(), totals.data()); break;
                default: attend<1>(query.data(), keys, values, D, S, last, w, sums.data(), totals.data()); break;
            }
            for (int g = 0; g < n; g++)
                for (int64_t d = 0; d < D; d++) out[at(g) + d] = T(sums[g * D + d] / totals[g]);
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
#endif  // !VNNI && !BF16

#endif  // LANES
