// Quantized weights times quantized activations (``--activations int8`` or
// ``int16``): y = x @ w^T + bias with both sides integers inside each group
// of 32 along K.
//
// Weights: unsigned codes u (4-bit 0..15, 8-bit 0..255, or with int16
// activations 5-bit 0..31: GGUF's Q5_0 / Q5_1 / Q5_K) with a float16
// scale s and offset o per group of 32 along a row, w = s * u + o. GGUF's Q4_1
// is exactly this (u = q, s = d, o = m); int8 codes q become u = q + 128 with
// o - 128 s.
// Activations: each group of 32 of a row as signed integers xq of A bits (8
// or 16) with a float scale dx (symmetric: dx = max|x| / (2^(A-1) - 1), xq =
// round(x / dx)), and sx = dx * sum(xq). A group's share of one output is
//     sum_i (s u_i + o)(dx xq_i) = s dx * sum_i u_i xq_i + o sx,
// the integer sum exact in int32 (at most 32 * 255 * 32767 < 2^31), so the
// float work is two multiply-adds per group instead of one per weight.
// Decode is bound by weight bytes; this reads them in their 4 or 8 bits and
// spends one instruction per 64 products (int8: vpdpbusd, u8 x s8) or 32
// (int16: vpdpwssd, s16 x s16) where AVX-512 VNNI has them. int8 activations
// are what llama.cpp does for its Q4/Q8 dot products; int16 ones round 256
// times finer, close to float32's results, for about the same decode speed.
//
// Weight layout (``int_activations.pack_codes`` builds it at load): output
// channels in tiles of 16; per tile, per group of 32 along K:
//   int8 activations: blocks of 16 channels x 4 codes, channel c's codes k =
//     4 j .. 4 j + 3 in block j: the operand of vpdpbusd / vpmaddubsw, with
//     the 4 activations of those k (4 bytes) broadcast to every lane. 4-bit
//     weights store blocks 2j and 2j + 1 in the same bytes, the first in the
//     low nibbles, the second in the high.
//   int16 activations: words of 32 bits, 16 of them (one a channel) per step
//     w. A word holds E = 16 / bits pairs of codes, pair e in bits [bits e,
//     bits (e + 1)) of each 16-bit half: the low half's code is k = 2 (E w +
//     e), the high half's k + 1. Pair e is the word masked and shifted within
//     16-bit lanes (and, shift: no widening shuffles, which AVX2 runs on
//     fewer ports than the rest and which bounded the one-row kernel), ready
//     for vpmaddwd / vpdpwssd against the broadcast activations of k and k + 1
//     (the 4 bytes of int16 word E w + e). 5-bit codes: E = 3, a group's 16
//     pairs in 6 words, the sixth holding pair 15 alone (6 bits a weight in
//     memory against 8 for 8-bit codes, for the same two instructions a pair).
// Scales and offsets are float16 [tiles, groups, 16].
//
// Every instruction set computes the same integers; the float work per output
// is the same sequence of operations whichever other rows share the call, so
// a row's result does not depend on its batch. (Builds differ only in whether
// the compiler fuses a multiply-add: the last bit of a float.)

#include <cmath>
#include <type_traits>
#include <utility>

#include "vec.h"

namespace {

constexpr int64_t GROUP = 32;
constexpr int TILE = 16;      // output channels per tile
constexpr int MR = VEC == 16 ? 8 : 4;  // rows per micro-tile: MR x TILE int32 + float accumulators in registers
constexpr int FV = TILE / VEC;  // float vectors per tile of outputs

typedef int32_t vi __attribute__((vector_size(VEC * sizeof(int32_t))));

// The int32 sums of one tile: TILE lanes, FV vectors.
struct IntAcc {
    vi v[FV];
};

inline float half_to_float(uint16_t h) {
    _Float16 v;
    std::memcpy(&v, &h, sizeof(v));
    return static_cast<float>(v);
}

// TILE float16 values as FV float vectors.
inline void load_halves(const uint16_t* p, vf* out) {
#if defined(__AVX512F__) && TS_VEC == 16
    out[0] = (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__) && TS_VEC == 8
    out[0] = (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    out[1] = (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
#else
    for (int v = 0; v < FV; ++v)
        for (int l = 0; l < VEC; ++l) out[v][l] = half_to_float(p[v * VEC + l]);
#endif
}

// One block of codes in registers and the instruction that multiplies it by
// a broadcast 4-byte word of activations, per activation width A (8 or 16):
//   Codes load(p): an 8-bit block from memory (TILE * L bytes);
//   Codes low(p) / high(p): the low / high nibbles of a 4-bit pair's bytes;
//   dot(acc, codes, x4): acc[c] += sum_t codes[c][t] * x[t], t < L.
template <int A>
struct Block;

#if defined(__AVX512VNNI__) && TS_VEC == 16
template <>
struct Block<8> {  // 64 u8: vpdpbusd
    typedef __m512i Codes;
    static Codes load(const uint8_t* p) { return _mm512_loadu_si512(p); }
    static Codes low(const uint8_t* p) { return _mm512_and_si512(load(p), _mm512_set1_epi8(15)); }
    static Codes high(const uint8_t* p) { return _mm512_and_si512(_mm512_srli_epi16(load(p), 4), _mm512_set1_epi8(15)); }
    template <int bits>  // the codes' width: one instruction either way
    static void dot(IntAcc& acc, Codes w, int32_t x4) {
        acc.v[0] = (vi)_mm512_dpbusd_epi32((__m512i)acc.v[0], w, _mm512_set1_epi32(x4));
    }
};
// int16 activations: a step's 16 words (one a channel) in one register;
// pair e of each is its bits [bits e, bits (e + 1)) in both 16-bit halves.
struct Pairs {
    typedef __m512i Words;
    typedef __m512i Codes;
    static Words load(const uint8_t* p) { return _mm512_loadu_si512(p); }
    template <int bits>
    static Codes pair(Words w, int e) {  // e is a constant once the loop over it is unrolled
        const int shift = bits * e;
        if (shift == 16 - bits) return _mm512_srli_epi16(w, shift);  // the last pair: the shift clears the rest
        const __m512i mask = _mm512_set1_epi16((1 << bits) - 1);
        return _mm512_and_si512(shift ? _mm512_srli_epi16(w, shift) : w, mask);
    }
    static void dot(IntAcc& acc, const Codes& codes, int32_t x2) {  // x2: the two activations
        acc.v[0] = (vi)_mm512_dpwssd_epi32((__m512i)acc.v[0], codes, _mm512_set1_epi32(x2));
    }
};
#elif defined(__AVX2__) && TS_VEC == 8
// An empty asm that takes the sum in a register and gives it back: the block
// loop's adds stay one running sum per register. Without it GCC, seeing a
// fully unrolled chain of integer adds, reassociates it into a tree, keeping
// every block's product alive: AVX2's 16 ymm spill them all (a store and a
// reload per product).
inline void keep_in_register(vi& v) { asm("" : "+x"(v)); }
inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
template <>
struct Block<8> {
    struct Codes {
        __m256i half[2];
    };
    static Codes load(const uint8_t* p) { return {{load256(p), load256(p + 32)}}; }
    static Codes low(const uint8_t* p) {
        const __m256i mask = _mm256_set1_epi8(15);
        return {{_mm256_and_si256(load256(p), mask), _mm256_and_si256(load256(p + 32), mask)}};
    }
    static Codes high(const uint8_t* p) {
        const __m256i mask = _mm256_set1_epi8(15);
        return {{_mm256_and_si256(_mm256_srli_epi16(load256(p), 4), mask), _mm256_and_si256(_mm256_srli_epi16(load256(p + 32), 4), mask)}};
    }
    // Without VNNI: vpmaddubsw (u8 x s8, adjacent pairs summed into
    // saturating int16) then vpmaddwd into int32. Codes below 16 never
    // saturate (2 * 15 * 128): 4-bit codes go in whole, 8-bit ones as their
    // two nibbles.
    template <int bits>
    static void dot(IntAcc& acc, const Codes& w, int32_t x4) {
        const __m256i x = _mm256_set1_epi32(x4), mask = _mm256_set1_epi8(15);
        for (int h = 0; h < 2; ++h) {
            if constexpr (bits == 4) {
                const __m256i sum = _mm256_madd_epi16(_mm256_maddubs_epi16(w.half[h], x), _mm256_set1_epi16(1));
                acc.v[h] = (vi)_mm256_add_epi32((__m256i)acc.v[h], sum);
                keep_in_register(acc.v[h]);
                continue;
            }
            const __m256i low_sum = _mm256_maddubs_epi16(_mm256_and_si256(w.half[h], mask), x);
            const __m256i high_sum = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w.half[h], 4), mask), x);
            const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(low_sum, _mm256_set1_epi16(1)),
                                                 _mm256_madd_epi16(high_sum, _mm256_set1_epi16(16)));
            acc.v[h] = (vi)_mm256_add_epi32((__m256i)acc.v[h], sum);
            keep_in_register(acc.v[h]);
        }
    }
};
struct Pairs {  // vpmaddwd: s16 x s16, adjacent pairs summed into int32, exact
    struct Words {
        __m256i half[2];  // channels 0-7, 8-15
    };
    typedef Words Codes;
    static Words load(const uint8_t* p) { return {{load256(p), load256(p + 32)}}; }
    template <int bits>
    static __m256i pair(__m256i w, int e) {  // e is a constant once the loop over it is unrolled
        const int shift = bits * e;
        if (shift == 16 - bits) return _mm256_srli_epi16(w, shift);  // the last pair: the shift clears the rest
        const __m256i mask = _mm256_set1_epi16((1 << bits) - 1);
        return _mm256_and_si256(shift ? _mm256_srli_epi16(w, shift) : w, mask);
    }
    template <int bits>
    static Codes pair(const Words& w, int e) {
        return {{pair<bits>(w.half[0], e), pair<bits>(w.half[1], e)}};
    }
    // The codes by value and each half named: taken by reference and
    // indexed in a loop, GCC kept the struct in memory, a store and a
    // reload of a code register per pair (35 stack accesses in the one-row
    // kernel, 9 now).
    static void dot(IntAcc& acc, Codes codes, int32_t x2) {
        const __m256i x = _mm256_set1_epi32(x2);
        acc.v[0] = (vi)_mm256_add_epi32((__m256i)acc.v[0], _mm256_madd_epi16(codes.half[0], x));
        keep_in_register(acc.v[0]);
        acc.v[1] = (vi)_mm256_add_epi32((__m256i)acc.v[1], _mm256_madd_epi16(codes.half[1], x));
        keep_in_register(acc.v[1]);
    }
};
#else
template <int A>
struct Block {  // plain C++: every build's reference behaviour
    static constexpr int L = 32 / A;
    struct Codes {
        uint8_t c[TILE * L];
    };
    static Codes load(const uint8_t* p) {
        Codes codes;
        std::memcpy(codes.c, p, sizeof(codes.c));
        return codes;
    }
    static Codes low(const uint8_t* p) {
        Codes codes = load(p);
        for (auto& c : codes.c) c &= 15;
        return codes;
    }
    static Codes high(const uint8_t* p) {
        Codes codes = load(p);
        for (auto& c : codes.c) c >>= 4;
        return codes;
    }
    // Not inlined: GCC spends over a minute unrolling and vectorizing this
    // scalar loop into every micro-kernel, for CPUs without AVX2 only.
    template <int bits>  // the codes' width: the same sums either way
    __attribute__((noinline)) static void dot(IntAcc& acc, const Codes& w, int32_t x4) {
        typedef std::conditional_t<A == 8, int8_t, int16_t> Act;
        Act x[L];
        std::memcpy(x, &x4, sizeof(x));
        for (int c = 0; c < TILE; ++c) {
            int32_t sum = 0;
            for (int t = 0; t < L; ++t) sum += static_cast<int32_t>(w.c[L * c + t]) * x[t];
            acc.v[c / VEC][c % VEC] += sum;
        }
    }
};
struct Pairs {  // plain C++
    struct Words {
        uint32_t w[TILE];
    };
    typedef Words Codes;  // each word's pair: the low half's code in its low 16 bits
    static Words load(const uint8_t* p) {
        Words words;
        std::memcpy(words.w, p, sizeof(words.w));
        return words;
    }
    template <int bits>
    static Codes pair(const Words& words, int e) {
        Codes codes;
        for (int c = 0; c < TILE; ++c) codes.w[c] = (words.w[c] >> (bits * e)) & ((1u << bits) - 1) * 0x10001u;
        return codes;
    }
    __attribute__((noinline)) static void dot(IntAcc& acc, const Codes& codes, int32_t x2) {
        int16_t x[2];
        std::memcpy(x, &x2, sizeof(x));
        for (int c = 0; c < TILE; ++c)
            acc.v[c / VEC][c % VEC] += static_cast<int32_t>(codes.w[c] & 0xFFFF) * x[0] + static_cast<int32_t>(codes.w[c] >> 16) * x[1];
    }
};
#endif

template <int A>
constexpr int lanes_codes() { return 32 / A; }  // L: codes per lane of a block
template <int A>
constexpr int64_t block_bytes() { return TILE * lanes_codes<A>(); }  // one 8-bit block
// int16 activations: E = 16 / bits code pairs a 32-bit word, ceil(16 / E)
// words a group (5-bit codes: 3 pairs a word, the sixth word's pair alone: 6
// bits a weight in memory, where 8-bit codes take 8).
template <int bits>
constexpr int pairs_per_word() { return 16 / bits; }
template <int bits>
constexpr int words_per_group() { return (GROUP / 2 + pairs_per_word<bits>() - 1) / pairs_per_word<bits>(); }
template <int A, int bits>
constexpr int64_t group_bytes() {  // one tile's codes of one group
    return A == 16 ? words_per_group<bits>() * TILE * 4 : GROUP * TILE * bits / 8;
}

// Independent int32 sums per row: at one or two rows each gets every
// chains-th product, so no dependent chain of dot instructions bounds the
// loop (vpdpwssd's latency is several cycles); more rows already interleave
// mr chains.
template <int A, int bits, int mr>
constexpr int chains_for() {
    if (A == 16 && VEC == 16 && mr == 1) return 16 / bits;  // 32 registers: a sum per pair
    if (A == 16 && VEC == 8) return mr == 1 ? 2 : 1;      // 16: every register a sum holds is one fewer for codes
    return mr <= 2 ? 2 : 1;
}

// One group's integer sums of rows [0..mr) against one tile: dots[i][c] for
// row i, chain c (their sum is the row's).
template <int mr, int A, int bits, int chains>
inline void group_dots(IntAcc (&dots)[mr][chains], const uint8_t* block, const uint8_t* x, int64_t ldx) {
    auto broadcast_word = [&](int i, int word) {  // each broadcast straight from memory
        int32_t value;
        std::memcpy(&value, x + i * ldx + 4 * word, sizeof(value));
        return value;
    };
    if constexpr (A == 16) {
        constexpr int E = pairs_per_word<bits>();
        auto word_dots = [&](int w, auto pairs) {  // pairs: how many of word w's E are codes (fewer in a last word)
            const typename Pairs::Words words = Pairs::load(block + w * TILE * 4);
#pragma GCC unroll 4
            for (int e = 0; e < decltype(pairs)::value; ++e) {
                const typename Pairs::Codes codes = Pairs::template pair<bits>(words, e);
#pragma GCC unroll 8
                for (int i = 0; i < mr; ++i) Pairs::dot(dots[i][e % chains], codes, broadcast_word(i, E * w + e));
            }
        };
        constexpr int full = GROUP / 2 / E, rest = GROUP / 2 % E;
#pragma GCC unroll 8
        for (int w = 0; w < full; ++w) word_dots(w, std::integral_constant<int, E>{});
        if constexpr (rest > 0) word_dots(full, std::integral_constant<int, rest>{});
    } else {
        using B = Block<A>;
        constexpr int blocks = GROUP / lanes_codes<A>();
#pragma GCC unroll 16
        for (int j = 0; j < blocks; j += 2) {
            typename B::Codes first, second;
            if (bits == 4) {
                first = B::low(block + j / 2 * block_bytes<A>());
                second = B::high(block + j / 2 * block_bytes<A>());
            } else {
                first = B::load(block + j * block_bytes<A>());
                second = B::load(block + (j + 1) * block_bytes<A>());
            }
#pragma GCC unroll 8
            for (int i = 0; i < mr; ++i) {
                B::template dot<bits>(dots[i][0], first, broadcast_word(i, j));
                B::template dot<bits>(dots[i][chains - 1], second, broadcast_word(i, j + 1));
            }
        }
    }
}

#ifndef TS_PREFETCH_BYTES
#define TS_PREFETCH_BYTES 2048
#endif
// Asks for the bytes [p + D, p + D + n), D = TS_PREFETCH_BYTES ahead of a
// group's codes (or scales) as the first block of rows reads them: a call of
// a few rows reads each weight once, straight from memory, and without it
// the loads stalled the dot instructions they feed (AMD EPYC Zen 4, one row
// of 3072 x 576 from memory: the time was the sum of the kernel's from cache
// and the bytes' at the memory's rate, not the larger of the two). The later
// blocks of rows find the tile in L1 / L2.
inline void prefetch_ahead(const uint8_t* p, int64_t n) {
    for (int64_t b = 0; b < n; b += 64) __builtin_prefetch(p + TS_PREFETCH_BYTES + b, 0, 0);
}

// Rows of activations xq [0..mr) (stride ldx bytes; dx, sx stride groups)
// against one tile of 16 channels; y[i * ldy + c] = result + bias[c] for c < nr.
template <int mr, int A, int bits>
void micro(const uint8_t* xq, int64_t ldx, const float* dx, const float* sx, int64_t groups, const uint8_t* codes,
           const uint16_t* scales, const uint16_t* offsets, const float* bias, float* y, int64_t ldy, int nr,
           bool prefetch) {
    constexpr int64_t x_group_bytes = GROUP * A / 8;
    constexpr int chains = chains_for<A, bits, mr>();
    vf acc[mr][FV];
    for (int i = 0; i < mr; ++i)
        for (int v = 0; v < FV; ++v) acc[i][v] = vf{};
    for (int64_t g = 0; g < groups; ++g) {
        if (prefetch) {
            prefetch_ahead(codes + g * group_bytes<A, bits>(), group_bytes<A, bits>());
            prefetch_ahead(reinterpret_cast<const uint8_t*>(scales + g * TILE), 2 * TILE);
            prefetch_ahead(reinterpret_cast<const uint8_t*>(offsets + g * TILE), 2 * TILE);
        }
        IntAcc dots[mr][chains];
        for (int i = 0; i < mr; ++i)
            for (int c = 0; c < chains; ++c)
                for (int v = 0; v < FV; ++v) dots[i][c].v[v] = vi{};
        group_dots<mr, A, bits, chains>(dots, codes + g * group_bytes<A, bits>(), xq + g * x_group_bytes, ldx);
        vf s[FV], o[FV];
        load_halves(scales + g * TILE, s);
        load_halves(offsets + g * TILE, o);
#pragma GCC unroll 8
        for (int i = 0; i < mr; ++i) {
            const vf d = splat(dx[i * groups + g]), sum = splat(sx[i * groups + g]);
            for (int v = 0; v < FV; ++v) {
                vi dot = dots[i][0].v[v];
                for (int c = 1; c < chains; ++c) dot += dots[i][c].v[v];
                acc[i][v] += __builtin_convertvector(dot, vf) * (s[v] * d);
                acc[i][v] += o[v] * sum;
            }
        }
    }
    for (int i = 0; i < mr; ++i) {
        float lanes[TILE];
        std::memcpy(lanes, acc[i], sizeof(lanes));
        for (int c = 0; c < nr; ++c) y[i * ldy + c] = lanes[c] + (bias ? bias[c] : 0.f);
    }
}

using Micro = void (*)(const uint8_t*, int64_t, const float*, const float*, int64_t, const uint8_t*, const uint16_t*,
                       const uint16_t*, const float*, float*, int64_t, int, bool);

template <int A, int bits, int... Rows>
Micro micro_for(int mr, std::integer_sequence<int, Rows...>) {
    static constexpr Micro table[] = {&micro<Rows + 1, A, bits>...};
    return table[mr - 1];
}

template <int A, int bits>
void gemm(const uint8_t* xq, const float* dx, const float* sx, int64_t M, int64_t groups, const uint8_t* codes,
          const uint16_t* scales, const uint16_t* offsets, const float* bias, float* y, int64_t N, int64_t tile_begin,
          int64_t tile_end) {
    const int64_t ldx = groups * GROUP * A / 8;
    for (int64_t t = tile_begin; t < tile_end; ++t) {
        const int64_t n0 = t * TILE;
        const int nr = static_cast<int>(N - n0 < TILE ? N - n0 : TILE);
        const uint8_t* tile_codes = codes + t * groups * group_bytes<A, bits>();
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int mr = static_cast<int>(M - m0 < MR ? M - m0 : MR);
            micro_for<A, bits>(mr, std::make_integer_sequence<int, MR>{})(
                xq + m0 * ldx, ldx, dx + m0 * groups, sx + m0 * groups, groups, tile_codes, scales + t * groups * TILE,
                offsets + t * groups * TILE, bias ? bias + n0 : nullptr, y + m0 * N + n0, N, nr, m0 == 0);
        }
    }
}

// max |in[i]| over a group's n values. A vector max, not std::fmax: that is
// a call into libm per value (its NaN rules keep GCC from inlining it), which
// was a few percent of a one-row step on the thread that waits for it. The
// maximum is exact in any order, so every build still finds the same one.
inline float group_amax(const float* in, int64_t n) {
    float amax = 0.f;
    if (n == GROUP) {
        vf m = vf{};
#pragma GCC unroll 4
        for (int64_t v = 0; v < GROUP; v += VEC) {
            const vf a = (vf)((vi)load(in + v) & 0x7fffffff);
            m = a > m ? a : m;
        }
        float lanes[VEC];
        std::memcpy(lanes, &m, sizeof(lanes));
        for (float a : lanes) amax = a > amax ? a : amax;
        return amax;
    }
    for (int64_t i = 0; i < n; ++i) {
        const float a = std::fabs(in[i]);
        amax = a > amax ? a : amax;
    }
    return amax;
}

template <typename Act>
void quantize_rows(const float* x, int64_t K, int64_t groups, Act* xq, float* dx, float* sx, int64_t m_begin,
                   int64_t m_end) {
    constexpr float top = sizeof(Act) == 1 ? 127.f : 32767.f;
    for (int64_t m = m_begin; m < m_end; ++m) {
        for (int64_t g = 0; g < groups; ++g) {
            const float* in = x + m * K + g * GROUP;
            const int64_t n = K - g * GROUP < GROUP ? K - g * GROUP : GROUP;
            const float amax = group_amax(in, n);
            const float d = amax / top;
            const float inverse = d > 0.f ? 1.f / d : 0.f;
            Act* out = xq + (m * groups + g) * GROUP;
            int32_t sum = 0;
            for (int64_t i = 0; i < GROUP; ++i) {
                const int32_t q = i < n ? static_cast<int32_t>(std::nearbyint(in[i] * inverse)) : 0;
                out[i] = static_cast<Act>(q);
                sum += q;
            }
            dx[m * groups + g] = d;
            sx[m * groups + g] = d * static_cast<float>(sum);
        }
    }
}

}  // namespace

// Rows [m_begin, m_end) of x [M, K] quantized per group of 32 (the last group
// zero-padded) to act_bits (8 or 16) signed integers: xq [M, groups * 32],
// dx and sx [M, groups]. Plain scalar code (each build vectorizes it its own
// way) with one rounding rule, so every build gives the same integers.
extern "C" void TS_NAME(ts_quantize_activations)(const float* x, int64_t K, int64_t groups, int64_t act_bits, void* xq,
                                                float* dx, float* sx, int64_t m_begin, int64_t m_end) {
    if (act_bits == 8)
        quantize_rows(x, K, groups, static_cast<int8_t*>(xq), dx, sx, m_begin, m_end);
    else
        quantize_rows(x, K, groups, static_cast<int16_t*>(xq), dx, sx, m_begin, m_end);
}

// Output tiles [tile_begin, tile_end) of y [M, N] from the quantized rows and
// the packed weight (layout above for act_bits); bits is 4 or 8, or 5 with
// int16 activations.
extern "C" void TS_NAME(ts_int_gemm)(const void* xq, int64_t act_bits, const float* dx, const float* sx, int64_t M,
                                    int64_t groups, const uint8_t* codes, int64_t bits, const uint16_t* scales,
                                    const uint16_t* offsets, const float* bias, float* y, int64_t N, int64_t tile_begin,
                                    int64_t tile_end) {
    const auto* x = static_cast<const uint8_t*>(xq);
    if (act_bits == 8 && bits == 4)
        gemm<8, 4>(x, dx, sx, M, groups, codes, scales, offsets, bias, y, N, tile_begin, tile_end);
    else if (act_bits == 8)
        gemm<8, 8>(x, dx, sx, M, groups, codes, scales, offsets, bias, y, N, tile_begin, tile_end);
    else if (bits == 4)
        gemm<16, 4>(x, dx, sx, M, groups, codes, scales, offsets, bias, y, N, tile_begin, tile_end);
    else if (bits == 5)
        gemm<16, 5>(x, dx, sx, M, groups, codes, scales, offsets, bias, y, N, tile_begin, tile_end);
    else
        gemm<16, 8>(x, dx, sx, M, groups, codes, scales, offsets, bias, y, N, tile_begin, tile_end);
}
