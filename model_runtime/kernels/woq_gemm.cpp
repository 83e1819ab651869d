// Weight-only-quantized GEMM for a few rows: y = x @ dequant(w)^T + bias, the
// weights int8 (one byte each) or 4-bit (two to a byte, in GGUF's order), each
// group of 32 along a row with its own float scale and offset.
//
// Compiled once per instruction set (build.py passes -DTS_ISA=<name> and the
// matching -m flags); the code is plain C++ with GCC vector extensions, so the
// same source becomes AVX-512, AVX2 or SSE2 code. No torch headers here: ops.cpp
// binds these functions to a torch op and picks the one measured fastest.
//
// Shape of the work: output channels are taken NR at a time. Each tile of NR
// weight rows is dequantized once into a small float scratch (it stays in L1),
// then every block of MR input rows is multiplied against it with MR x NR
// vector accumulators. A decode step (1-64 rows) therefore reads each weight
// byte from memory once, which is the point: int8 weights are a quarter of
// float32's bytes, and decode is bound by weight bytes.

#include <cstdlib>

#include "vec.h"

#ifndef TS_MR
#error "compile with -DTS_MR=<rows per micro-tile>"
#endif

namespace {

constexpr int MR = TS_MR;
constexpr int NR = 4;        // output channels per tile
constexpr int64_t GROUP = 32; // weights per (scale, offset) pair along K; int8 rows may take 16 (GGUF's Q6_K)
static_assert(16 % VEC == 0, "a vector never straddles two groups");
constexpr int64_t MB = 64;   // input rows per block: a block of x stays in L2

typedef int8_t vq __attribute__((vector_size(VEC)));

inline vf load_partial(const float* p, int64_t n) {
    float lanes[VEC] = {};
    std::memcpy(lanes, p, n * sizeof(float));
    return load(lanes);
}

// VEC int8 weights as floats: sign-extend and convert, two instructions with
// AVX2 or AVX-512 (GCC scalarizes __builtin_convertvector from int8 there).
inline vf load_q(const int8_t* p) {
#if defined(__AVX512F__) && TS_VEC == 16
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__) && TS_VEC == 8
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
    vq v;
    std::memcpy(&v, p, sizeof(vq));
    return __builtin_convertvector(v, vf);
#endif
}

inline vf load_q_partial(const int8_t* p, int64_t n) {
    int8_t lanes[VEC] = {};
    std::memcpy(lanes, p, n);
    return load_q(lanes);
}

// VEC 4-bit weights as floats (0..15): the low nibbles of VEC bytes, or
// (high) their high nibbles. Both halves of a group read the same bytes, so
// the compiler loads them once.
template <bool high>
inline vf load_nibbles(const uint8_t* p) {
#if defined(__AVX512F__) && TS_VEC == 16
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return (vf)_mm512_cvtepi32_ps(high ? _mm512_srli_epi32(bytes, 4) : _mm512_and_si512(bytes, _mm512_set1_epi32(15)));
#elif defined(__AVX2__) && TS_VEC == 8
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return (vf)_mm256_cvtepi32_ps(high ? _mm256_srli_epi32(bytes, 4) : _mm256_and_si256(bytes, _mm256_set1_epi32(15)));
#else
    typedef uint8_t vu __attribute__((vector_size(VEC)));
    typedef int32_t vi __attribute__((vector_size(VEC * sizeof(int32_t))));
    vu v;
    std::memcpy(&v, p, sizeof(vu));
    const vi bytes = __builtin_convertvector(v, vi);
    return __builtin_convertvector(high ? bytes >> 4 : bytes & 15, vf);
#endif
}

// Where the NR weight rows of a tile come from: a float scratch (zero-padded
// to a multiple of VEC) or the int8 rows themselves, converted as they are read.
//
// Each reads STEP weights of a row at a time (a multiple of VEC), as
// sub(j, k, s): the s-th vector from k on, k a multiple of STEP; tail() is the
// last partial vector where K is not a multiple of STEP.
struct FloatRows {
    static constexpr int64_t STEP = VEC;
    const float* rows;
    int64_t ld;
    vf sub(int j, int64_t k, int) const { return load(rows + j * ld + k); }
    vf tail(int j, int64_t k, int64_t) const { return load(rows + j * ld + k); }
};

// Quantized rows of K weights with one (scale, offset) per 2^shift weights
// along a row (GROUP, or 16 for int8): w = q * scale + offset. from(n) is the
// same matrix from row n on.
template <typename Q, typename Self>
struct GroupRows {
    const Q* rows;
    int64_t ld;            // Q elements per row
    const float* scales;   // [rows, groups]
    const float* offsets;  // [rows, groups]
    int64_t groups;
    int shift;             // log2 of the group size
    Self from(int64_t n) const { return Self{{rows + n * ld, ld, scales + n * groups, offsets + n * groups, groups, shift}}; }
    vf dequant(int j, int64_t k, vf q) const {
        const int64_t g = j * groups + (k >> shift);
        return q * scales[g] + offsets[g];
    }
};

// int8 rows: one byte a weight.
struct Int8Rows : GroupRows<int8_t, Int8Rows> {
    static constexpr int64_t STEP = VEC;
    vf sub(int j, int64_t k, int) const { return dequant(j, k, load_q(rows + j * ld + k)); }
    vf tail(int j, int64_t k, int64_t n) const { return dequant(j, k, load_q_partial(rows + j * ld + k, n)); }
};

// 4-bit rows as GGUF's Q4_0/Q4_1 blocks hold them: each group of 32 weights is
// 16 bytes, byte i holding weight i in its low nibble and weight i + 16 in its
// high one. A step is a whole group; K is a multiple of GROUP (no tail).
struct Int4Rows : GroupRows<uint8_t, Int4Rows> {
    static constexpr int64_t STEP = GROUP;
    static_assert(GROUP / 2 % VEC == 0, "a vector of nibbles never straddles a half-group");
    vf sub(int j, int64_t k, int s) const {  // s is a constant once the caller's loop is unrolled
        const int in_group = s * VEC;
        const uint8_t* p = rows + j * ld + k / 2 + in_group % (GROUP / 2);
        return dequant(j, k, in_group < GROUP / 2 ? load_nibbles<false>(p) : load_nibbles<true>(p));
    }
    vf tail(int j, int64_t k, int64_t) const { return sub(j, k, 0); }  // never called: no tail
};

// rows x[0..mr) (stride ldx) against the tile's NR weight rows; writes
// y[i * ldy + j] = dot + bias[j] for j < nr.
template <int mr, typename Rows>
inline void micro(const float* x, int64_t ldx, int64_t K, Rows w_rows, float* y, int64_t ldy, int nr,
                  const float* bias) {
    vf acc[mr][NR];
#pragma GCC unroll 8
    for (int i = 0; i < mr; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) acc[i][j] = vf{};
    int64_t k = 0;
    for (; k + Rows::STEP <= K; k += Rows::STEP) {
#pragma GCC unroll 8
        for (int s = 0; s < Rows::STEP / VEC; ++s) {
            vf w[NR];
#pragma GCC unroll 4
            for (int j = 0; j < NR; ++j) w[j] = w_rows.sub(j, k, s);
#pragma GCC unroll 8
            for (int i = 0; i < mr; ++i) {
                const vf xv = load(x + i * ldx + k + s * VEC);
#pragma GCC unroll 4
                for (int j = 0; j < NR; ++j) acc[i][j] += xv * w[j];
            }
        }
    }
    if (k + VEC <= K) __builtin_unreachable();  // STEP is VEC where K may have a tail
    if (k < K) {
        vf w[NR];
        for (int j = 0; j < NR; ++j) w[j] = w_rows.tail(j, k, K - k);
        for (int i = 0; i < mr; ++i) {
            const vf xv = load_partial(x + i * ldx + k, K - k);
            for (int j = 0; j < NR; ++j) acc[i][j] += xv * w[j];
        }
    }
    for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nr; ++j) y[i * ldy + j] = hsum(acc[i][j]) + (bias ? bias[j] : 0.f);
}

template <typename Rows>
using MicroFn = void (*)(const float*, int64_t, int64_t, Rows, float*, int64_t, int, const float*);

template <typename Rows, int... Counts>
struct MicroTable {
    static constexpr MicroFn<Rows> table[] = {nullptr, &micro<Counts, Rows>...};
};

template <typename Rows, int N, int... Counts>
struct MakeTable : MakeTable<Rows, N - 1, N, Counts...> {};
template <typename Rows, int... Counts>
struct MakeTable<Rows, 0, Counts...> : MicroTable<Rows, Counts...> {};

template <typename Rows>
inline MicroFn<Rows> micro_for(int mr) { return MakeTable<Rows, MR>::table[mr]; }

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// y = x @ w^T + bias for output channels [n_begin, n_end) of y [M, N], the
// weights w [N, K] read through ``all`` (Int8Rows or Int4Rows).
//
// Up to MR rows (a decode step of a few requests) read the int8 rows directly
// (convert, dequantize and FMA per weight vector). More rows dequantize each
// tile of NR weight rows once into a float scratch that stays in L1 and
// multiply every block of MR rows against it; blocks of MB rows keep x in L2
// for a long prefill.
template <typename Rows>
void gemm(const float* x, int64_t M, int64_t K, const Rows& all, const float* bias, float* y, int64_t N,
          int64_t n_begin, int64_t n_end) {
    const int64_t ldt = round_up(K, VEC);
    float* tile = static_cast<float*>(std::aligned_alloc(64, round_up(NR * ldt * sizeof(float), 64)));
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mb = M - m0 < MB ? M - m0 : MB;
        for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
            const int nr = static_cast<int>(n_end - n0 < NR ? n_end - n0 : NR);
            const float* bias_n = bias ? bias + n0 : nullptr;
            const Rows rows = all.from(n0);
            if (mb <= MR && nr == NR) {
                micro_for<Rows>(static_cast<int>(mb))(x + m0 * K, K, K, rows, y + m0 * N + n0, N, nr, bias_n);
                continue;
            }
            for (int j = 0; j < NR; ++j) {
                float* out = tile + j * ldt;
                if (j >= nr) {
                    std::memset(out, 0, ldt * sizeof(float));
                    continue;
                }
                int64_t k = 0;
                for (; k + Rows::STEP <= K; k += Rows::STEP)
#pragma GCC unroll 8
                    for (int s = 0; s < Rows::STEP / VEC; ++s) {
                        const vf v = rows.sub(j, k, s);
                        std::memcpy(out + k + s * VEC, &v, sizeof(vf));
                    }
                if (k < K) {
                    const vf v = rows.tail(j, k, K - k);
                    float lanes[VEC];
                    std::memcpy(lanes, &v, sizeof(vf));
                    for (int64_t i = k; i < ldt; ++i) out[i] = i < K ? lanes[i - k] : 0.f;
                }
            }
            for (int64_t i0 = 0; i0 < mb; i0 += MR) {
                const int mr = static_cast<int>(mb - i0 < MR ? mb - i0 : MR);
                const int64_t row = m0 + i0;
                micro_for<FloatRows>(mr)(x + row * K, K, K, FloatRows{tile, ldt}, y + row * N + n0, N, nr, bias_n);
            }
        }
    }
    std::free(tile);
}

// Rows [n_begin, n_end) of the weight dequantized to float32 out [N, K]: for a
// long prefill, torch's GEMM over this beats the kernel above.
template <typename Rows>
void dequantize(const Rows& all, int64_t K, float* out, int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
        const Rows row = all.from(n);
        float* dst = out + n * K;
        int64_t k = 0;
        for (; k + Rows::STEP <= K; k += Rows::STEP)
#pragma GCC unroll 8
            for (int s = 0; s < Rows::STEP / VEC; ++s) {
                const vf v = row.sub(0, k, s);
                std::memcpy(dst + k + s * VEC, &v, sizeof(vf));
            }
        if (k < K) {
            const vf v = row.tail(0, k, K - k);
            std::memcpy(dst + k, &v, (K - k) * sizeof(float));
        }
    }
}

inline int64_t groups_of(int64_t K, int64_t group) { return (K + group - 1) / group; }
inline int shift_of(int64_t group) { return group == 16 ? 4 : 5; }

}  // namespace

// int8 weights q [N, K] with a float (scale, offset) per ``group`` (32 or 16)
// weights of a row, w = q * scale + offset; scales and offsets are
// [N, ceil(K / group)].
extern "C" void TS_NAME(ts_int8_gemm)(const float* x, int64_t M, int64_t K, const int8_t* q, const float* scales,
                                      const float* offsets, int64_t group, const float* bias, float* y, int64_t N,
                                      int64_t n_begin, int64_t n_end) {
    gemm(x, M, K, Int8Rows{{q, K, scales, offsets, groups_of(K, group), shift_of(group)}}, bias, y, N, n_begin, n_end);
}

extern "C" void TS_NAME(ts_int8_dequantize)(const int8_t* q, const float* scales, const float* offsets, int64_t group,
                                            int64_t K, float* out, int64_t n_begin, int64_t n_end) {
    dequantize(Int8Rows{{q, K, scales, offsets, groups_of(K, group), shift_of(group)}}, K, out, n_begin, n_end);
}

// 4-bit weights packed [N, K / 2] in GGUF's order (Int4Rows), K a multiple of
// GROUP, with a (scale, offset) per group: w = nibble * scale + offset
// (``group`` is always GROUP here).
extern "C" void TS_NAME(ts_int4_gemm)(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* scales,
                                      const float* offsets, int64_t, const float* bias, float* y, int64_t N,
                                      int64_t n_begin, int64_t n_end) {
    gemm(x, M, K, Int4Rows{{packed, K / 2, scales, offsets, groups_of(K, GROUP), shift_of(GROUP)}}, bias, y, N, n_begin, n_end);
}

extern "C" void TS_NAME(ts_int4_dequantize)(const uint8_t* packed, const float* scales, const float* offsets, int64_t,
                                            int64_t K, float* out, int64_t n_begin, int64_t n_end) {
    dequantize(Int4Rows{{packed, K / 2, scales, offsets, groups_of(K, GROUP), shift_of(GROUP)}}, K, out, n_begin, n_end);
}
