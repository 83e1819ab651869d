// What every per-instruction-set kernel source shares: the build's names and
// the float vector type with its loads, stores and lane sum. Each source is
// compiled once per instruction set (see __init__.py: -DTS_ISA=<name>
// -DTS_VEC=<float lanes> and the matching -m flags), so this is plain C++
// with GCC vector extensions, intrinsics only where GCC would scalarize.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef TS_ISA
#error "compile with -DTS_ISA=<name>"
#endif
#ifndef TS_VEC
#error "compile with -DTS_VEC=<float lanes per vector>"
#endif

#define TS_CAT2(a, b) a##_##b
#define TS_CAT(a, b) TS_CAT2(a, b)
#define TS_NAME(name) TS_CAT(name, TS_ISA)

namespace {

constexpr int VEC = TS_VEC;
typedef float vf __attribute__((vector_size(VEC * sizeof(float))));

inline vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof(vf));
    return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

inline vf splat(float x) { return vf{} + x; }

// The lanes' sum: in registers where the instruction set has the shuffles,
// else a pairwise tree (log2(VEC) dependent adds). Summing the lanes in a row
// was a VEC-long chain of dependent adds per output, which cost more than the
// products themselves when K is short.
inline float hsum(vf v) {
#if defined(__AVX512F__) && TS_VEC == 16
    return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX2__) && TS_VEC == 8
    const __m128 halves = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    const __m128 pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
    return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
#else
    float lanes[VEC];
    std::memcpy(lanes, &v, sizeof(vf));
#pragma GCC unroll 8
    for (int width = VEC / 2; width >= 1; width /= 2)
#pragma GCC unroll 16
        for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
    return lanes[0];
#endif
}

}  // namespace
