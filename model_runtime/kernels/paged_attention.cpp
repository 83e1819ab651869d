// Decode attention over the paged KV cache: one new query token per sequence,
// reading each sequence's keys and values straight from its blocks.
//
// The PyTorch path gathers every sequence's blocks into a padded [B, L] copy
// and runs one masked SDPA call per layer; at 16 short sequences that is
// mostly per-call overhead and copies. Here one work item is a (sequence, KV
// head) pair: its query heads (a GQA group) share each key and value row as
// it is read, scores go to a scratch row, softmax is exact (max subtracted,
// vectorized exp), and the output is the probability-weighted sum of values.
// A sequence of more than ops.cpp's kDecodeSpan visible tokens is read a span
// an item instead, each span's softmax kept unnormalized with its maximum and
// merged in ops.cpp, so one sequence's heads still keep both threads busy.
// Compiled once per instruction set like woq_gemm.cpp; no torch headers.

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>
#include <vector>

#include "vec.h"

namespace {

typedef int32_t vi __attribute__((vector_size(VEC * sizeof(int32_t))));

// exp(x) for x <= 0 (scores minus their maximum), to about 2 ulp: 2^n * p(r)
// with x = n ln2 + r, |r| <= ln2 / 2, p a degree-6 polynomial; below -87 the
// result is 0 (a probability under 1e-38 of the largest).
inline vf exp_nonpositive(vf x) {
    const vf low = splat(-87.f);
    const vi underflow = x < low;
    x = x < low ? low : x;
    const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
    const vf shifted = x * splat(1.44269504088896341f) + magic;
    vi n;
    std::memcpy(&n, &shifted, sizeof(vi));
    n -= 0x4B400000;  // the bits of magic
    const vf nf = shifted - magic;
    vf r = x - nf * splat(0.693145751953125f);
    r = r - nf * splat(1.42860682030941723212e-6f);
    vf p = splat(1.f / 720) * r + splat(1.f / 120);
    p = p * r + splat(1.f / 24);
    p = p * r + splat(1.f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.f);
    p = p * r + splat(1.f);
    const vi bits = (n + 127) << 23;
    vf scale;
    std::memcpy(&scale, &bits, sizeof(vf));
    const vf result = p * scale;
    return underflow ? vf{} : result;
}

constexpr int64_t MAX_CHUNKS = 512 / VEC;  // head_dim up to 512
constexpr int64_t BLOCK = 8;               // scores computed together (score_block)

// out[p] = the lane sum of acc[p], p < BLOCK. With AVX2 (and AVX-512, its
// vectors folded to 8 lanes first) a transpose by horizontal adds: nine
// instructions for eight sums where a sum apiece took six.
inline void lane_sums(const vf* acc, float* out) {
#if defined(__AVX2__) && (TS_VEC == 8 || TS_VEC == 16)
    __m256 v[BLOCK];
    for (int p = 0; p < BLOCK; ++p) {
#if TS_VEC == 16
        v[p] = _mm256_add_ps(_mm512_castps512_ps256((__m512)acc[p]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd((__m512)acc[p]), 1)));
#else
        v[p] = (__m256)acc[p];
#endif
    }
    const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 low = _mm256_hadd_ps(h01, h23), high = _mm256_hadd_ps(h45, h67);  // each 128-bit half: 4 partial sums
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31)));
#else
    for (int p = 0; p < BLOCK; ++p) out[p] = hsum(acc[p]);
#endif
}

// The query's (chunks vectors, scaled) scores against the BLOCK key rows at
// k_cache + rows[p]: each row's products summed along it into one vector,
// then the lanes (lane_sums). One key row at a time, the sum of its lanes
// was a chain of dependent adds and shuffles per score.
template <int64_t SLOTS>
inline void score_block(const vf* qv, int64_t chunks, const float* k_cache, const int64_t* rows, float* out) {
    vf acc[BLOCK];
#pragma GCC unroll 8
    for (int p = 0; p < BLOCK; ++p) acc[p] = qv[0] * load(k_cache + rows[p]);
#pragma GCC unroll 32
    for (int64_t c = 1; c < (SLOTS < MAX_CHUNKS ? SLOTS : chunks); ++c) {
        const vf query = qv[c];
#pragma GCC unroll 8
        for (int p = 0; p < BLOCK; ++p) acc[p] += query * load(k_cache + rows[p] + c * VEC);
    }
    lane_sums(acc, out);
}

// One work item (sequence b, KV head kv_head) with CHUNKS vectors per head
// row, known at compile time (the query and the accumulators then live in
// registers: with a run-time count and room for 512 they lived in memory, and
// the kernel ran 30 % slower at head_dim 64), or 0: D / VEC at run time.
// Block-major: each BLOCK of key rows is scored for every query head of the
// group while it sits in L1, and each block of value rows summed into every
// head's output likewise. Head by head, each head re-read all the rows, from
// L3 or memory once an item's keys and values outgrew L2 (a few hundred tokens).
template <int64_t CHUNKS>
void attend_item(const float* q, int64_t q_stride_b, int64_t q_stride_h, const float* k_cache, const float* v_cache,
                 int64_t block_size, int64_t kv_heads, int64_t D, const int64_t* tables, int64_t max_blocks,
                 const int64_t* lens, int64_t heads, float scale, int64_t window, float softcap, const float* sinks,
                 float* out, int64_t item, std::vector<float>& scores, std::vector<int64_t>& rows, int64_t lo,
                 int64_t hi, float* partial) {
    constexpr int64_t SLOTS = CHUNKS > 0 ? CHUNKS : MAX_CHUNKS;
    const int64_t chunks = CHUNKS > 0 ? CHUNKS : D / VEC;
    const int64_t group = heads / kv_heads;
    const int64_t b = item / kv_heads, kv_head = item % kv_heads, len = lens[b];
    // The visible tokens [first, len), of which this item reads [first + lo, first + hi).
    const int64_t first = (window > 0 && len > window ? len - window : 0) + lo, n = hi - lo;
    const int64_t* table = tables + b * max_blocks;
    const bool whole = partial == nullptr;  // else a span of a split context: sinks are the merge's
    rows.resize(n);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t t = first + i;
        rows[i] = ((table[t / block_size] * block_size + t % block_size) * kv_heads + kv_head) * D;
    }
    // scores [group, n], each head's weighted sums [group, D], softmax denominators and maxima [group]:
    // the exact softmax needs every score before any sum
    scores.resize(group * (n + D + 2));
    float* sums = scores.data() + group * n;
    float* denominators = sums + group * D;
    float* maxima = denominators + group;
    const auto query_of = [&](int64_t g, vf* qv) {
        const float* query = q + b * q_stride_b + (kv_head * group + g) * q_stride_h;
        for (int64_t c = 0; c < chunks; ++c) qv[c] = load(query + c * VEC) * splat(scale);
    };
    const int64_t blocked = n - n % BLOCK;
    for (int64_t t = 0; t < blocked; t += BLOCK) {
        for (int64_t g = 0; g < group; ++g) {
            vf qv[SLOTS];
            query_of(g, qv);
            score_block<SLOTS>(qv, chunks, k_cache, rows.data() + t, scores.data() + g * n + t);
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        const int64_t head = kv_head * group + g;
        vf qv[SLOTS];
        query_of(g, qv);
        float* s = scores.data() + g * n;
        for (int64_t t = blocked; t < n; ++t) {
            const float* key = k_cache + rows[t];
            vf acc0 = qv[0] * load(key), acc1 = {};
            for (int64_t c = 1; c + 1 < chunks; c += 2) {
                acc0 += qv[c] * load(key + c * VEC);
                acc1 += qv[c + 1] * load(key + (c + 1) * VEC);
            }
            if (chunks % 2 == 0) acc1 += qv[chunks - 1] * load(key + (chunks - 1) * VEC);
            s[t] = hsum(acc0 + acc1);
        }
        float max = sinks != nullptr && whole ? sinks[head] : -3.4e38f;
        for (int64_t t = 0; t < n; ++t) {
            if (softcap > 0.f) s[t] = softcap * std::tanh(s[t] / softcap);
            max = s[t] > max ? s[t] : max;
        }
        vf total = {};
        int64_t t = 0;
        for (; t + VEC <= n; t += VEC) {
            const vf p = exp_nonpositive(load(s + t) - splat(max));
            store(s + t, p);
            total += p;
        }
        float sum = hsum(total);
        if (t < n) {
            float lanes[VEC];
            for (int i = 0; i < VEC; ++i) lanes[i] = t + i < n ? s[t + i] - max : -100.f;
            const vf p = exp_nonpositive(load(lanes));
            std::memcpy(lanes, &p, sizeof(vf));
            for (int64_t i = t; i < n; ++i) {
                s[i] = lanes[i - t];
                sum += s[i];
            }
        }
        if (sinks != nullptr && whole) sum += std::exp(sinks[head] - max);
        for (int64_t c = 0; c < chunks; ++c) store(sums + g * D + c * VEC, vf{});
        denominators[g] = sum;
        maxima[g] = max;
    }
    // The weighted sums, block by block of value rows, each block for every head while in L1.
    for (int64_t begin = 0; begin < n; begin += BLOCK) {
        const int64_t end = begin + BLOCK < n ? begin + BLOCK : n;
        for (int64_t g = 0; g < group; ++g) {
            const float* s = scores.data() + g * n;
            vf acc[SLOTS];
            for (int64_t c = 0; c < chunks; ++c) acc[c] = load(sums + g * D + c * VEC);
            for (int64_t t = begin; t < end; ++t) {
                const float* value = v_cache + rows[t];
                const vf p = splat(s[t]);
                for (int64_t c = 0; c < chunks; ++c) acc[c] += p * load(value + c * VEC);
            }
            for (int64_t c = 0; c < chunks; ++c) store(sums + g * D + c * VEC, acc[c]);
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        if (!whole) {  // [max, denominator, sums (D)] per head, for the merge
            float* span = partial + g * (D + 2);
            span[0] = maxima[g];
            span[1] = denominators[g];
            std::memcpy(span + 2, sums + g * D, D * sizeof(float));
            continue;
        }
        float* out_head = out + (b * heads + kv_head * group + g) * D;
        const vf inverse = splat(1.f / denominators[g]);
        for (int64_t c = 0; c < chunks; ++c) store(out_head + c * VEC, load(sums + g * D + c * VEC) * inverse);
    }
}

using Item = decltype(&attend_item<0>);

template <int64_t... Chunks>
constexpr std::array<Item, sizeof...(Chunks)> item_table(std::integer_sequence<int64_t, Chunks...>) {
    return {attend_item<Chunks>...};
}

// ITEMS[c]: the kernel for c chunks a head row, c up to 32 (every head size
// up to 512 on AVX-512, up to 256 on AVX2); ITEMS[0] counts at run time.
constexpr auto ITEMS = item_table(std::make_integer_sequence<int64_t, 33>{});

}  // namespace

// Work items [item_begin, item_end) of B * kv_heads, item = b * kv_heads + kv_head:
// query heads kv_head * group .. + group of sequence b (group = heads / kv_heads)
// attend over its lens[b] cached tokens, token t at block tables[b][t / block_size],
// slot t % block_size. q [B, heads, D] with strides (q_stride_b, q_stride_h, 1);
// caches [num_blocks, block_size, kv_heads, D] contiguous; out [B, heads, D] contiguous.
// The layer's features (attention.LayerFeatures): with window > 0 only the last
// window tokens are read (older blocks may hold another request's tokens by now);
// with softcap > 0 each score s becomes softcap * tanh(s / softcap); sinks (one
// float per query head, or null) add exp(sink) to each softmax's denominator.
//
// With span > 0 each (sequence, KV head) is `splits` items, item = (b *
// kv_heads + kv_head) * splits + s: a sequence of more than span visible
// tokens is read span tokens an item (so two threads share even one
// sequence's heads), each item leaving its heads' [max, denominator, sums]
// in partials [B * kv_heads, splits, group, D + 2] for ops.cpp's merge; one of
// at most span tokens is attended whole by its s = 0 item, as without spans.
// The split depends on the sequence's own length only, never on the batch.
extern "C" void TS_NAME(ts_paged_decode)(const float* q, int64_t q_stride_b, int64_t q_stride_h, const float* k_cache,
                                         const float* v_cache, int64_t block_size, int64_t kv_heads, int64_t D,
                                         const int64_t* tables, int64_t max_blocks, const int64_t* lens, int64_t heads,
                                         float scale, int64_t window, float softcap, const float* sinks, float* out,
                                         int64_t span, int64_t splits, float* partials, int64_t item_begin, int64_t item_end) {
    std::vector<float> scores;
    std::vector<int64_t> rows;
    const int64_t chunks = D / VEC;  // ops.cpp: D is a multiple of 16 (so of VEC), at most 512
    const auto run = chunks < static_cast<int64_t>(ITEMS.size()) ? ITEMS[chunks] : attend_item<0>;
    const int64_t group = heads / kv_heads;
    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t pair = span > 0 ? item / splits : item, s = span > 0 ? item % splits : 0;
        const int64_t len = lens[pair / kv_heads], visible = window > 0 && len > window ? window : len;
        if (span == 0 || visible <= span) {
            if (s == 0)
                run(q, q_stride_b, q_stride_h, k_cache, v_cache, block_size, kv_heads, D, tables, max_blocks, lens, heads,
                    scale, window, softcap, sinks, out, pair, scores, rows, 0, visible, nullptr);
            continue;
        }
        if (s * span >= visible) continue;
        run(q, q_stride_b, q_stride_h, k_cache, v_cache, block_size, kv_heads, D, tables, max_blocks, lens, heads, scale,
            window, softcap, sinks, out, pair, scores, rows, s * span, std::min(visible, (s + 1) * span),
            partials + (item * group) * (D + 2));
    }
}
