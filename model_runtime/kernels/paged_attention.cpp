// Decode attention over the paged KV cache: one new query token per sequence,
// reading each sequence's keys and values straight from its blocks.
//
// The PyTorch path gathers every sequence's blocks into a padded [B, L] copy
// and runs one masked SDPA call per layer; at 16 short sequences that is
// mostly per-call overhead and copies. Here one work item is a (sequence, KV
// head) pair: its query heads (a GQA group) share each key and value row as
// it is read, scores go to a scratch row, softmax is exact (max subtracted,
// vectorized exp), and the output is the probability-weighted sum of values.
// Compiled once per instruction set like woq_gemm.cpp; no torch headers.

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

// One work item (sequence b, KV head kv_head) with CHUNKS vectors per head
// row, known at compile time (the query and the accumulators then live in
// registers: with a run-time count and room for 512 they lived in memory, and
// the kernel ran 30 % slower at head_dim 64), or 0: D / VEC at run time.
template <int64_t CHUNKS>
void attend_item(const float* q, int64_t q_stride_b, int64_t q_stride_h, const float* k_cache, const float* v_cache,
                 int64_t block_size, int64_t kv_heads, int64_t D, const int64_t* tables, int64_t max_blocks,
                 const int64_t* lens, int64_t heads, float scale, int64_t window, float softcap, const float* sinks,
                 float* out, int64_t item, std::vector<float>& scores, std::vector<int64_t>& rows) {
    constexpr int64_t SLOTS = CHUNKS > 0 ? CHUNKS : MAX_CHUNKS;
    const int64_t chunks = CHUNKS > 0 ? CHUNKS : D / VEC;
    const int64_t group = heads / kv_heads;
    const int64_t b = item / kv_heads, kv_head = item % kv_heads, len = lens[b];
    const int64_t first = window > 0 && len > window ? len - window : 0, n = len - first;
    const int64_t* table = tables + b * max_blocks;
    rows.resize(n);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t t = first + i;
        rows[i] = ((table[t / block_size] * block_size + t % block_size) * kv_heads + kv_head) * D;
    }
    scores.resize(group * n);
    for (int64_t g = 0; g < group; ++g) {
        const int64_t head = kv_head * group + g;
        const float* query = q + b * q_stride_b + head * q_stride_h;
        vf qv[SLOTS];
        for (int64_t c = 0; c < chunks; ++c) qv[c] = load(query + c * VEC) * splat(scale);
        float* s = scores.data() + g * n;
        float max = sinks != nullptr ? sinks[head] : -3.4e38f;
        for (int64_t t = 0; t < n; ++t) {
            const float* key = k_cache + rows[t];
            vf acc0 = qv[0] * load(key), acc1 = {};
            for (int64_t c = 1; c + 1 < chunks; c += 2) {
                acc0 += qv[c] * load(key + c * VEC);
                acc1 += qv[c + 1] * load(key + (c + 1) * VEC);
            }
            if (chunks % 2 == 0) acc1 += qv[chunks - 1] * load(key + (chunks - 1) * VEC);
            float score = hsum(acc0 + acc1);
            if (softcap > 0.f) score = softcap * std::tanh(score / softcap);
            s[t] = score;
            max = score > max ? score : max;
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
        if (sinks != nullptr) sum += std::exp(sinks[head] - max);
        vf acc[SLOTS];
        for (int64_t c = 0; c < chunks; ++c) acc[c] = vf{};
        for (int64_t t2 = 0; t2 < n; ++t2) {
            const float* value = v_cache + rows[t2];
            const vf p = splat(s[t2]);
            for (int64_t c = 0; c < chunks; ++c) acc[c] += p * load(value + c * VEC);
        }
        float* out_head = out + (b * heads + head) * D;
        const vf inverse = splat(1.f / sum);
        for (int64_t c = 0; c < chunks; ++c) store(out_head + c * VEC, acc[c] * inverse);
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
extern "C" void TS_NAME(ts_paged_decode)(const float* q, int64_t q_stride_b, int64_t q_stride_h, const float* k_cache,
                                         const float* v_cache, int64_t block_size, int64_t kv_heads, int64_t D,
                                         const int64_t* tables, int64_t max_blocks, const int64_t* lens, int64_t heads,
                                         float scale, int64_t window, float softcap, const float* sinks, float* out,
                                         int64_t item_begin, int64_t item_end) {
    std::vector<float> scores;
    std::vector<int64_t> rows;
    const int64_t chunks = D / VEC;  // ops.cpp: D is a multiple of 16 (so of VEC), at most 512
    const auto run = chunks < static_cast<int64_t>(ITEMS.size()) ? ITEMS[chunks] : attend_item<0>;
    for (int64_t item = item_begin; item < item_end; ++item)
        run(q, q_stride_b, q_stride_h, k_cache, v_cache, block_size, kv_heads, D, tables, max_blocks, lens, heads, scale,
            window, softcap, sinks, out, item, scores, rows);
}
