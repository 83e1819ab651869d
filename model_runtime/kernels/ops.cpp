// torch ops over the per-ISA kernels of woq_gemm.cpp:
//   tokenstep::int8_linear(x, q, scales, offsets, bias, isa, gemm_from_rows) -> y
// x: float32 [..., K]; q: int8 [N, K] (contiguous); scales, offsets: float32
// [N, ceil(K / 32)], w = q * scale + offset per group of 32 weights of a row
// (or [N, K / 16] for groups of 16, GGUF's Q6_K);
// bias: float32 [N] or None;
//   tokenstep::int8_dequantize(q, scales, offsets, isa) -> float32 [N, K];
//   tokenstep::paged_decode_attention(query, key_cache, value_cache, block_tables,
//   context_lens, scale, isa, window, softcap, sinks) -> out: one new token per
//   sequence attending over its paged cache (paged_attention.cpp), with the
//   layer's sliding window, soft-capping and sinks (0 / None: none);
//   tokenstep::write_kv_cache(key, value, key_cache, value_cache, slot_mapping):
//   a step's new K/V into their slots;
//   tokenstep::paged_attention_step(query, key, value, key_cache, value_cache,
//   metadata, scale, window, softcap, sinks): one layer's whole step of
//   attention (both of the above and SDPA, or plain math where the layer
//   soft-caps or has sinks, for prefill chunks) from step_graph.pack's metadata;
//   tokenstep::int_linear(x, codes, scales, offsets, bias, bits, act_bits, out_features, isa):
//   the activations quantized to int8 or int16 per group of 32 too (int_gemm.cpp);
//   tokenstep::rms_norm(x, weight, eps), tokenstep::rotary(q, k, cos, sin) and
//   tokenstep::silu_mul(gate, up), silu_mul_halves(gate_up) and qkv_rotary(qkv, cos, sin,
//   head_dim, q_size, kv_size) (the outputs of merged projections): the elementwise work around a Llama-style
//   decoder layer's matmuls, one op each instead of 6 to 16 (model_runtime.fused);
//   tokenstep::llama_layers(hidden, weights, biases, ints, floats, cos, sin, key_caches,
//   value_caches, metadata, window, softcap, sinks): consecutive whole Llama decoder
//   layers of quantized linears, those ops in the Python layer's order, one call;
//   tokenstep::int4_linear / int4_dequantize: the same with packed uint8
// [N, K / 2], two 4-bit weights a byte in GGUF's Q4 order (a group's byte i
// holds weight i low, weight i + 16 high), K a multiple of 32;
// isa: an index into isas() or -1 for the first
// (widest) this CPU supports. Output channels are split across torch's
// intra-op threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/add.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/softmax.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

extern "C" {
#define TS_DECLARE(isa)                                                                                       \
    void ts_int8_gemm_##isa(const float* x, int64_t M, int64_t K, const int8_t* q, const float* scales, \
                            const float* offsets, int64_t group, const float* bias, float* y, int64_t N, int64_t n_begin, \
                            int64_t n_end);
#define TS_DECLARE_DEQUANTIZE(isa) \
    void ts_int8_dequantize_##isa(const int8_t* q, const float* scales, const float* offsets, int64_t group, int64_t K, \
                                  float* out, int64_t n_begin, int64_t n_end);
TS_DECLARE_DEQUANTIZE(avx512)
TS_DECLARE_DEQUANTIZE(avx2)
TS_DECLARE_DEQUANTIZE(generic)
#define TS_DECLARE_INT4(isa)                                                                                     \
    void ts_int4_gemm_##isa(const float* x, int64_t M, int64_t K, const uint8_t* q, const float* scales,          \
                            const float* offsets, int64_t group, const float* bias, float* y, int64_t N, int64_t n_begin, \
                            int64_t n_end);                                                                       \
    void ts_int4_dequantize_##isa(const uint8_t* q, const float* scales, const float* offsets, int64_t group, int64_t K, \
                                  float* out, int64_t n_begin, int64_t n_end);
TS_DECLARE(avx512)
TS_DECLARE(avx2)
TS_DECLARE(generic)
TS_DECLARE_INT4(avx512)
TS_DECLARE_INT4(avx2)
TS_DECLARE_INT4(generic)
#define TS_DECLARE_INT(isa)                                                                                       \
    void ts_quantize_activations_##isa(const float* x, int64_t K, int64_t groups, int64_t act_bits, void* xq,       \
                                       float* dx, float* sx, int64_t m_begin, int64_t m_end);                       \
    void ts_int_gemm_##isa(const void* xq, int64_t act_bits, const float* dx, const float* sx, int64_t M,           \
                           int64_t groups, const uint8_t* codes, int64_t bits, const uint16_t* scales,              \
                           const uint16_t* offsets, const float* bias, float* y, int64_t N, int64_t tile_begin,     \
                           int64_t tile_end);
TS_DECLARE_INT(avx512)
TS_DECLARE_INT(avx2)
TS_DECLARE_INT(generic)
#define TS_DECLARE_ATTENTION(isa)                                                                                   \
    void ts_paged_decode_##isa(const float* q, int64_t q_stride_b, int64_t q_stride_h, const float* k_cache,          \
                               const float* v_cache, int64_t block_size, int64_t kv_heads, int64_t D,                 \
                               const int64_t* tables, int64_t max_blocks, const int64_t* lens, int64_t heads,         \
                               float scale, int64_t window, float softcap, const float* sinks, float* out,            \
                               int64_t span, int64_t splits, float* partials, int64_t item_begin, int64_t item_end);
TS_DECLARE_ATTENTION(avx512)
TS_DECLARE_ATTENTION(avx2)
TS_DECLARE_ATTENTION(generic)
}

namespace {

// (..., scales, offsets, group, ...): group is the weights per (scale, offset), 32 or (int8 only) 16.
using Int8Gemm = void (*)(const float*, int64_t, int64_t, const int8_t*, const float*, const float*, int64_t, const float*,
                          float*, int64_t, int64_t, int64_t);

using Int8Dequantize = void (*)(const int8_t*, const float*, const float*, int64_t, int64_t, float*, int64_t, int64_t);
using Int4Gemm = void (*)(const float*, int64_t, int64_t, const uint8_t*, const float*, const float*, int64_t, const float*,
                          float*, int64_t, int64_t, int64_t);
using Int4Dequantize = void (*)(const uint8_t*, const float*, const float*, int64_t, int64_t, float*, int64_t, int64_t);
using QuantizeActivations = void (*)(const float*, int64_t, int64_t, int64_t, void*, float*, float*, int64_t, int64_t);
using IntGemm = void (*)(const void*, int64_t, const float*, const float*, int64_t, int64_t, const uint8_t*, int64_t,
                         const uint16_t*, const uint16_t*, const float*, float*, int64_t, int64_t, int64_t);
using PagedDecode = void (*)(const float*, int64_t, int64_t, const float*, const float*, int64_t, int64_t, int64_t,
                             const int64_t*, int64_t, const int64_t*, int64_t, float, int64_t, float, const float*, float*,
                             int64_t, int64_t, float*, int64_t, int64_t);

struct Isa {
    const char* name;
    bool supported;
    Int8Gemm int8_gemm;
    Int8Dequantize int8_dequantize;
    Int4Gemm int4_gemm;
    Int4Dequantize int4_dequantize;
    PagedDecode paged_decode;
    QuantizeActivations quantize_activations;
    IntGemm int_gemm;
};

const std::vector<Isa>& all_isas() {
    static const std::vector<Isa> isas = {
        // The AVX-512 build also uses VNNI (vpdpbusd) and BW: every AVX-512
        // part this project has met has both; one without runs the AVX2 build.
        {"avx512", __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma"),
         &ts_int8_gemm_avx512, &ts_int8_dequantize_avx512, &ts_int4_gemm_avx512, &ts_int4_dequantize_avx512,
         &ts_paged_decode_avx512, &ts_quantize_activations_avx512, &ts_int_gemm_avx512},
        {"avx2", __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), &ts_int8_gemm_avx2, &ts_int8_dequantize_avx2,
         &ts_int4_gemm_avx2, &ts_int4_dequantize_avx2, &ts_paged_decode_avx2, &ts_quantize_activations_avx2, &ts_int_gemm_avx2},
        {"generic", true, &ts_int8_gemm_generic, &ts_int8_dequantize_generic, &ts_int4_gemm_generic,
         &ts_int4_dequantize_generic, &ts_paged_decode_generic, &ts_quantize_activations_generic, &ts_int_gemm_generic},
    };
    return isas;
}

std::vector<std::string> isas() {
    std::vector<std::string> names;
    for (const auto& isa : all_isas())
        if (isa.supported) names.emplace_back(isa.name);
    return names;
}

const Isa& pick(int64_t index) {
    std::vector<const Isa*> supported;
    for (const auto& isa : all_isas())
        if (isa.supported) supported.push_back(&isa);
    TORCH_CHECK(index >= -1 && index < static_cast<int64_t>(supported.size()), "isa index ", index, " out of range");
    return *supported[index < 0 ? 0 : index];
}

constexpr int64_t kTile = 4;    // output channels per kernel tile (woq_gemm.cpp: NR)
constexpr int64_t kGroup = 32;  // weights per (scale, offset) (woq_gemm.cpp: GROUP)
constexpr int64_t kAttentionLanes = 16;  // the widest build's VEC: every build's chunks divide head_dim

// The weight's N, K and group, checked: int8 q is [N, K]; 4-bit q is [N, K / 2]
// bytes, K a multiple of the group. The group is 32, or for int8 16 where the
// scales say so ([N, K / 16], K a multiple of 16).
struct Shape {
    int64_t N, K, group;
};

Shape check_weight(const char* op, const at::Tensor& q, bool int4, const at::Tensor& scales, const at::Tensor& offsets) {
    const auto dtype = int4 ? at::kByte : at::kChar;
    TORCH_CHECK(q.scalar_type() == dtype && q.dim() == 2 && q.is_contiguous(), op, ": q must be contiguous ",
                int4 ? "uint8 [N, K / 2]" : "int8 [N, K]");
    const int64_t N = q.size(0), K = int4 ? 2 * q.size(1) : q.size(1);
    TORCH_CHECK(!int4 || K % kGroup == 0, op, ": K must be a multiple of ", kGroup, ", got ", K);
    const int64_t groups = (K + kGroup - 1) / kGroup;
    const bool sixteen = !int4 && K % 16 == 0 && scales.dim() == 2 && scales.size(1) == K / 16 && K / 16 != groups;
    const int64_t expected = sixteen ? K / 16 : groups;
    for (const auto* t : {&scales, &offsets})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                        t->size(1) == expected,
                    op, ": scales and offsets must be contiguous float32 [", N, ", ", groups, "]",
                    int4 ? "" : " (or [N, K / 16] for groups of 16)");
    return {N, K, sixteen ? 16 : kGroup};
}

// What every linear op shares: x float32 [..., K] (K checked by the caller)
// as contiguous rows, their count M, the output y [..., N] and the bias
// (float32 [N]) or null.
struct LinearCall {
    at::Tensor input;
    int64_t M;
    at::Tensor y;
    const float* bias;
};

LinearCall linear_call(const char* op, const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias) {
    TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32");
    const float* bias_data = nullptr;
    if (bias.has_value() && bias->defined()) {
        TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, op, ": bias must be float32 [N]");
        bias_data = bias->data_ptr<float>();
    }
    at::Tensor input = x.contiguous();
    const int64_t K = x.size(-1);
    std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
    out_shape.back() = N;
    return {input, K > 0 ? input.numel() / K : 0, at::empty(out_shape, x.options()), bias_data};
}

template <typename Q, typename Gemm>
at::Tensor linear(const char* op, bool int4, Gemm Isa::*kernel, const at::Tensor& x, const at::Tensor& q,
                  const at::Tensor& scales, const at::Tensor& offsets, const c10::optional<at::Tensor>& bias,
                  int64_t isa) {
    const auto [N, K, group] = check_weight(op, q, int4, scales, offsets);
    TORCH_CHECK(x.size(-1) == K, op, ": x has ", x.size(-1), " features, the weight ", K);
    const LinearCall call = linear_call(op, x, N, bias);  // not a structured binding: C++17 lambdas cannot capture one
    if (call.M == 0) return call.y;
    const Gemm gemm = pick(isa).*kernel;
    const float* xd = call.input.data_ptr<float>();
    const Q* qd = q.data_ptr<Q>();
    const float* sd = scales.data_ptr<float>();
    const float* od = offsets.data_ptr<float>();
    float* yd = call.y.data_ptr<float>();
    const int64_t tiles = (N + kTile - 1) / kTile;
    at::parallel_for(0, tiles, 1, [&, N = N, K = K, group = group](int64_t begin, int64_t end) {
        gemm(xd, call.M, K, qd, sd, od, group, call.bias, yd, N, begin * kTile, std::min(end * kTile, N));
    });
    return call.y;
}

template <typename Q, typename Dequantize>
at::Tensor dequantize(const char* op, bool int4, Dequantize Isa::*kernel, const at::Tensor& q, const at::Tensor& scales,
                      const at::Tensor& offsets, int64_t isa) {
    const auto [N, K, group] = check_weight(op, q, int4, scales, offsets);
    at::Tensor out = at::empty({N, K}, q.options().dtype(at::kFloat));
    const Dequantize run = pick(isa).*kernel;
    const Q* qd = q.data_ptr<Q>();
    const float* sd = scales.data_ptr<float>();
    const float* od = offsets.data_ptr<float>();
    float* outd = out.data_ptr<float>();
    at::parallel_for(0, N, 16, [&, K = K, group = group](int64_t begin, int64_t end) { run(qd, sd, od, group, K, outd, begin, end); });
    return out;
}

at::Tensor int8_dequantize(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& offsets, int64_t isa) {
    return dequantize<int8_t>("int8_dequantize", false, &Isa::int8_dequantize, q, scales, offsets, isa);
}

at::Tensor int4_dequantize(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& offsets, int64_t isa) {
    return dequantize<uint8_t>("int4_dequantize", true, &Isa::int4_dequantize, q, scales, offsets, isa);
}

// From gemm_from_rows rows on (when > 0), the weight is dequantized and
// torch's GEMM runs instead: faster for long prefills (measured at load).
// The switch lives here rather than in Python so that a compiled forward
// has no branch on the row count.
bool use_gemm(const at::Tensor& x, int64_t gemm_from_rows) {
    return gemm_from_rows > 0 && x.size(-1) > 0 && x.numel() / x.size(-1) >= gemm_from_rows;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& offsets,
                       const c10::optional<at::Tensor>& bias, int64_t isa, int64_t gemm_from_rows) {
    if (use_gemm(x, gemm_from_rows)) return at::linear(x, int8_dequantize(q, scales, offsets, isa), bias);
    return linear<int8_t>("int8_linear", false, &Isa::int8_gemm, x, q, scales, offsets, bias, isa);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& offsets,
                       const c10::optional<at::Tensor>& bias, int64_t isa, int64_t gemm_from_rows) {
    if (use_gemm(x, gemm_from_rows)) return at::linear(x, int4_dequantize(q, scales, offsets, isa), bias);
    return linear<uint8_t>("int4_linear", true, &Isa::int4_gemm, x, q, scales, offsets, bias, isa);
}

constexpr int64_t kIntTile = 16;  // output channels per tile (int_gemm.cpp: TILE)

// x [..., K] float32 against a weight packed by int_activations.pack_codes for
// act_bits (8 or 16) activations: codes uint8 [tiles, groups, 32 * bits / 8
// * 16 bytes; 384 for 5-bit codes], scales and offsets float16 [tiles, groups, 16]; N output
// channels (tiles * 16 or a few fewer), K at most groups * 32. The rows are
// quantized per group of 32 first (int_gemm.cpp).
at::Tensor int_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets,
                      const c10::optional<at::Tensor>& bias, int64_t bits, int64_t act_bits, int64_t N, int64_t isa) {
    const char* op = "int_linear";
    TORCH_CHECK(act_bits == 8 || act_bits == 16, op, ": act_bits must be 8 or 16, got ", act_bits);
    TORCH_CHECK(bits == 4 || bits == 8 || (bits == 5 && act_bits == 16), op,
                ": bits must be 4 or 8 (or 5 with 16-bit activations), got ", bits);
    // int16 activations: words of 16 / bits code pairs, 16 pairs a group (int_gemm.cpp)
    const int64_t pairs_per_word = 16 / bits, words = (kGroup / 2 + pairs_per_word - 1) / pairs_per_word;
    const int64_t group_bytes = act_bits == 16 ? words * 4 * kIntTile : kGroup * bits / 8 * kIntTile;
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.is_contiguous() && codes.size(2) == group_bytes,
                op, ": codes must be contiguous uint8 [tiles, groups, ", group_bytes, "]");
    const int64_t tiles = codes.size(0), groups = codes.size(1);
    for (const auto* t : {&scales, &offsets})
        TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 3 && t->size(0) == tiles &&
                        t->size(1) == groups && t->size(2) == kIntTile,
                    op, ": scales and offsets must be contiguous float16 [", tiles, ", ", groups, ", ", kIntTile, "]");
    TORCH_CHECK(N > (tiles - 1) * kIntTile && N <= tiles * kIntTile, op, ": ", N, " outputs do not fill ", tiles, " tiles");
    const int64_t K = x.size(-1);
    TORCH_CHECK(K > (groups - 1) * kGroup && K <= groups * kGroup, op, ": x has ", K, " features, the weight ", groups,
                " groups of ", kGroup);
    const LinearCall call = linear_call(op, x, N, bias);  // not a structured binding: C++17 lambdas cannot capture one
    if (call.M == 0) return call.y;
    const int64_t M = call.M;
    // One scratch allocation (an op's few microseconds count at one row): dx and sx
    // [M, groups] float32, then the quantized rows xq [M, groups * 32] of act_bits.
    at::Tensor scratch = at::empty({2 * M * groups + M * groups * kGroup * act_bits / 32}, x.options());
    const Isa& kernels = pick(isa);
    const float* xd = call.input.data_ptr<float>();
    float* dxd = scratch.data_ptr<float>();
    float* sxd = dxd + M * groups;
    void* xqd = sxd + M * groups;
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
        kernels.quantize_activations(xd, K, groups, act_bits, xqd, dxd, sxd, begin, end);
    });
    const uint8_t* cd = codes.data_ptr<uint8_t>();
    const auto* sd = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
    const auto* od = reinterpret_cast<const uint16_t*>(offsets.data_ptr<at::Half>());
    float* yd = call.y.data_ptr<float>();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
        kernels.int_gemm(xqd, act_bits, dxd, sxd, M, groups, cd, bits, sd, od, call.bias, yd, N, begin, end);
    });
    return call.y;
}

// The step's new keys and values into their cache slots: key/value [kv_heads,
// T, head_dim] as the model hands them (rows contiguous), caches [num_blocks,
// block_size, kv_heads, head_dim] contiguous float32, slot_mapping [T]. One
// call for both tensors instead of two index_copy_ over transposed views.
void write_kv_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                    const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
    const char* op = "write_kv_cache";
    TORCH_CHECK(key_cache.scalar_type() == at::kFloat && key_cache.dim() == 4 && key_cache.is_contiguous() &&
                    value_cache.sizes() == key_cache.sizes() && value_cache.scalar_type() == at::kFloat &&
                    value_cache.is_contiguous(),
                op, ": caches must be contiguous float32 [num_blocks, block_size, kv_heads, head_dim], both the same");
    const int64_t kv_heads = key_cache.size(2), D = key_cache.size(3), num_slots = key_cache.size(0) * key_cache.size(1);
    for (const auto* t : {&key, &value})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == kv_heads && t->size(2) == D &&
                        t->stride(2) == 1 && t->size(1) == key.size(1),
                    op, ": key and value must be float32 [", kv_heads, ", T, ", D, "] with contiguous rows");
    const int64_t T = key.size(1);
    TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.size(0) == T &&
                    slot_mapping.is_contiguous(),
                op, ": slot_mapping must be contiguous int64 [T]");
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, op, ": slot ", slots[t], " out of range");
    float* caches[2] = {key_cache.data_ptr<float>(), value_cache.data_ptr<float>()};
    const at::Tensor* sources[2] = {&key, &value};
    for (int which = 0; which < 2; ++which) {
        const float* src = sources[which]->data_ptr<float>();
        const int64_t stride_h = sources[which]->stride(0), stride_t = sources[which]->stride(1);
        for (int64_t t = 0; t < T; ++t)
            for (int64_t h = 0; h < kv_heads; ++h)
                std::memcpy(caches[which] + (slots[t] * kv_heads + h) * D, src + h * stride_h + t * stride_t,
                            D * sizeof(float));
    }
}

// The layer's sinks as the kernels read them: float32 [heads] contiguous, or null.
const float* sinks_data(const char* op, const c10::optional<at::Tensor>& sinks, int64_t heads) {
    if (!sinks.has_value() || !sinks->defined()) return nullptr;
    TORCH_CHECK(sinks->scalar_type() == at::kFloat && sinks->is_contiguous() && sinks->numel() == heads, op,
                ": sinks must be contiguous float32 [", heads, "]");
    return sinks->data_ptr<float>();
}

constexpr int64_t kDecodeSpan = 128;  // visible tokens a decode item reads at most (ts_paged_decode)

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t isa, int64_t window, double softcap, const c10::optional<at::Tensor>& sinks) {
    const char* op = "paged_decode_attention";
    TORCH_CHECK(query.scalar_type() == at::kFloat && query.dim() == 3 && query.stride(2) == 1, op,
                ": query must be float32 [B, heads, head_dim] with contiguous rows");
    TORCH_CHECK(key_cache.scalar_type() == at::kFloat && key_cache.dim() == 4 && key_cache.is_contiguous() &&
                    value_cache.sizes() == key_cache.sizes() && value_cache.scalar_type() == at::kFloat &&
                    value_cache.is_contiguous(),
                op, ": caches must be contiguous float32 [num_blocks, block_size, kv_heads, head_dim], both the same");
    const int64_t B = query.size(0), heads = query.size(1), D = query.size(2);
    const int64_t num_blocks = key_cache.size(0), block_size = key_cache.size(1), kv_heads = key_cache.size(2);
    TORCH_CHECK(key_cache.size(3) == D, op, ": the cache's head_dim is ", key_cache.size(3), ", the query's ", D);
    TORCH_CHECK(heads % kv_heads == 0, op, ": ", heads, " query heads are not a multiple of ", kv_heads, " KV heads");
    TORCH_CHECK(D % kAttentionLanes == 0 && D <= 512, op, ": head_dim must be a multiple of ", kAttentionLanes,
                " up to 512, got ", D);
    TORCH_CHECK(window >= 0 && softcap >= 0, op, ": window and softcap must not be negative");
    TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous() &&
                    block_tables.size(0) == B,
                op, ": block_tables must be contiguous int64 [B, max_blocks]");
    TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.dim() == 1 && context_lens.is_contiguous() &&
                    context_lens.size(0) == B,
                op, ": context_lens must be contiguous int64 [B]");
    const float* sinks_ptr = sinks_data(op, sinks, heads);
    const int64_t max_blocks = block_tables.size(1);
    const int64_t* lens = context_lens.data_ptr<int64_t>();
    const int64_t* tables = block_tables.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size, op, ": sequence ", b, " has ", lens[b],
                    " cached tokens, its table room for ", max_blocks * block_size);
        // Only the blocks the window reads must be live: older ones may have gone back to the pool.
        const int64_t first = window > 0 && lens[b] > window ? lens[b] - window : 0;
        for (int64_t i = first / block_size; i < (lens[b] + block_size - 1) / block_size; ++i)
            TORCH_CHECK(tables[b * max_blocks + i] >= 0 && tables[b * max_blocks + i] < num_blocks, op, ": block id ",
                        tables[b * max_blocks + i], " out of range");
    }
    at::Tensor out = at::empty({B, heads, D}, query.options());
    const PagedDecode run = pick(isa).paged_decode;
    const float* qd = query.data_ptr<float>();
    const float* kd = key_cache.data_ptr<float>();
    const float* vd = value_cache.data_ptr<float>();
    float* outd = out.data_ptr<float>();
    const int64_t q_stride_b = query.stride(0), q_stride_h = query.stride(1);
    // Sequences of more than kDecodeSpan visible tokens are read a span an
    // item and merged after (ts_paged_decode): at one sequence its 3 KV heads
    // were 3 items on 2 threads, one thread idle a third of the kernel.
    const auto spans_of = [&](int64_t b) {  // a sequence's spans: its visible tokens, kDecodeSpan a span
        const int64_t visible = window > 0 && lens[b] > window ? window : lens[b];
        return (visible + kDecodeSpan - 1) / kDecodeSpan;
    };
    int64_t splits = 1;
    for (int64_t b = 0; b < B; ++b) splits = std::max(splits, spans_of(b));
    const int64_t group = heads / kv_heads;
    at::Tensor partials = splits > 1 ? at::empty({B * kv_heads * splits * group * (D + 2)}, query.options()) : at::Tensor();
    float* pd = splits > 1 ? partials.data_ptr<float>() : nullptr;
    at::parallel_for(0, B * kv_heads * splits, 1, [&](int64_t begin, int64_t end) {
        run(qd, q_stride_b, q_stride_h, kd, vd, block_size, kv_heads, D, tables, max_blocks, lens, heads,
            static_cast<float>(scale), window, static_cast<float>(softcap), sinks_ptr, outd, splits > 1 ? kDecodeSpan : 0,
            splits, pd, begin, end);
    });
    if (splits == 1) return out;
    // The spans' softmaxes as one: each span's sums and denominator scaled by
    // exp(its max - the largest), the sinks' exp(sink - the largest) added once.
    at::parallel_for(0, B * heads, 16, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) {
            const int64_t b = bh / heads, head = bh % heads, kv_head = head / group, g = head % group;
            const int64_t spans = spans_of(b);
            if (spans == 1) continue;  // attended whole
            const float* first = pd + ((b * kv_heads + kv_head) * splits * group + g) * (D + 2);
            const auto part = [&](int64_t s) { return first + s * group * (D + 2); };
            float max = sinks_ptr != nullptr ? sinks_ptr[head] : -3.4e38f;
            for (int64_t s = 0; s < spans; ++s) max = std::max(max, part(s)[0]);
            float denominator = sinks_ptr != nullptr ? std::exp(sinks_ptr[head] - max) : 0.f;
            float* o = outd + bh * D;
            for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
            for (int64_t s = 0; s < spans; ++s) {
                const float weight = std::exp(part(s)[0] - max);
                denominator += part(s)[1] * weight;
                for (int64_t d = 0; d < D; ++d) o[d] += part(s)[2 + d] * weight;
            }
            const float inverse = 1.f / denominator;
            for (int64_t d = 0; d < D; ++d) o[d] *= inverse;
        }
    });
    return out;
}

// A prefill chunk's attention as the model's own eager code computes it,
// for layers that soft-cap their scores or have sinks (SDPA can do
// neither): q [1, heads, n, D], k and v [1, kv_heads, L, D / Dv], mask [n, L]
// bool; returns [1, heads, n, Dv].
at::Tensor attention_math(const at::Tensor& q, at::Tensor k, at::Tensor v, const at::Tensor& mask, double scale,
                          double softcap, const c10::optional<at::Tensor>& sinks) {
    const int64_t group = q.size(1) / k.size(1);
    if (group > 1) {
        k = k.repeat_interleave(group, 1);
        v = v.repeat_interleave(group, 1);
    }
    at::Tensor scores = at::matmul(q, k.transpose(-1, -2)).mul_(scale);  // [1, heads, n, L]
    if (softcap > 0) scores = scores.div_(softcap).tanh_().mul_(softcap);
    scores.masked_fill_(mask.logical_not(), -INFINITY);
    at::Tensor probs;
    if (sinks.has_value() && sinks->defined()) {
        const at::Tensor sink_column = sinks->to(scores.scalar_type()).view({1, -1, 1, 1}).expand({1, q.size(1), q.size(2), 1});
        probs = at::softmax(at::cat({scores, sink_column}, -1), -1).narrow(-1, 0, scores.size(-1));
    } else {
        probs = at::softmax(scores, -1);
    }
    return at::matmul(probs, v);
}

// One layer's attention for a whole step, all in C++: the step's new K/V
// into their slots, the decode rows through the paged kernel, each prefill
// chunk through SDPA over its gathered blocks (causal; a chunk after cached
// tokens sees them all; with a window, only its last window of them), or
// through attention_math where the layer soft-caps or has sinks. The step's
// layout comes as one int64 tensor,
// ``step_graph.pack``'s: header [serial, T, B, width, prefills, mask block
// size], per prefill (start, new tokens, cached tokens, blocks), then the
// slot mapping [T], decode context lengths [B] and block tables [B * width],
// then each prefill's block ids. query [1, heads, T, D], key and value [1,
// kv_heads, T, D]; returns [1, T, heads, D]. Python's attention.attend does
// the same with about ten torch calls a layer, which cost more than the
// attention itself in a decode step of a few rows.
at::Tensor paged_attention_step(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& metadata,
                                double scale, int64_t window, double softcap, const c10::optional<at::Tensor>& sinks) {
    const char* op = "paged_attention_step";
    constexpr int64_t kHeader = 6, kSpan = 4;
    TORCH_CHECK(metadata.scalar_type() == at::kLong && metadata.dim() == 1 && metadata.is_contiguous() &&
                    metadata.size(0) >= kHeader,
                op, ": metadata must be step_graph.pack's contiguous int64 tensor");
    TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4 && query.size(0) == 1, op,
                ": query, key and value must be [1, heads, T, head_dim]");
    const int64_t* meta = metadata.data_ptr<int64_t>();
    const int64_t T = meta[1], B = meta[2], width = meta[3], P = meta[4];
    int64_t at = kHeader + P * kSpan;
    TORCH_CHECK(T == query.size(2) && B >= 0 && B <= T && P >= 0 && at + T + B * (1 + width) <= metadata.size(0), op,
                ": metadata does not describe this step");
    const int64_t* spans = meta + kHeader;
    const auto rows_contiguous = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
    write_kv_cache(rows_contiguous(key.select(0, 0)), rows_contiguous(value.select(0, 0)), key_cache, value_cache,
                   metadata.narrow(0, at, T));
    at += T;
    const at::Tensor q = rows_contiguous(query.select(0, 0));  // [heads, T, D]
    at::Tensor decoded;
    if (B > 0) {
        const at::Tensor lens = metadata.narrow(0, at, B);
        const at::Tensor tables = metadata.narrow(0, at + B, B * width).view({B, width});
        at += B + B * width;
        decoded = paged_decode_attention(q.narrow(1, 0, B).transpose(0, 1), key_cache, value_cache, tables, lens, scale, -1,
                                         window, softcap, sinks);
        if (P == 0) return decoded.unsqueeze(0);
    }
    const int64_t heads = q.size(0), kv_heads = key_cache.size(2), block_size = key_cache.size(1);
    const bool math = softcap > 0 || (sinks.has_value() && sinks->defined());
    at::Tensor out = at::empty({T, heads, value_cache.size(3)}, query.options());
    if (B > 0) out.narrow(0, 0, B).copy_(decoded);
    for (int64_t p = 0; p < P; ++p) {
        const int64_t start = spans[p * kSpan], fresh = spans[p * kSpan + 1], cached = spans[p * kSpan + 2];
        const int64_t num_blocks = spans[p * kSpan + 3], context = cached + fresh;
        TORCH_CHECK(start >= B && start + fresh <= T && at + num_blocks <= metadata.size(0) &&
                        context <= num_blocks * block_size,
                    op, ": prefill ", p, " does not fit the step");
        // Blocks from the one holding the chunk's first visible key (cached - window + 1) on.
        const int64_t first_block = window > 0 ? std::max<int64_t>(cached - window + 1, 0) / block_size : 0;
        const int64_t first_position = first_block * block_size, visible = context - first_position;
        const int64_t read_blocks = (context + block_size - 1) / block_size - first_block;
        const at::Tensor block_ids = metadata.narrow(0, at + first_block, read_blocks);
        at += num_blocks;
        // [blocks, block_size, kv_heads, D] -> [1, kv_heads, visible, D]
        const auto gather = [&](const at::Tensor& cache) {
            return cache.index_select(0, block_ids).flatten(0, 1).narrow(0, 0, visible).transpose(0, 1).unsqueeze(0);
        };
        const at::Tensor chunk = q.narrow(1, start, fresh).unsqueeze(0);  // [1, heads, fresh, D]
        c10::optional<at::Tensor> mask;
        if (cached > 0 || window > 0 || math) {  // query i sits at position cached + i
            const at::Tensor keys_at = at::arange(first_position, context, metadata.options()).unsqueeze(0);
            const at::Tensor queries_at = at::arange(cached, context, metadata.options()).unsqueeze(1);
            at::Tensor visible_mask = keys_at.le(queries_at);  // [fresh, visible]
            if (window > 0) visible_mask.logical_and_(keys_at.gt(queries_at.sub(window)));
            mask = visible_mask;
        }
        const at::Tensor attended = math ? attention_math(chunk, gather(key_cache), gather(value_cache), *mask, scale, softcap, sinks)
                                         : at::scaled_dot_product_attention(chunk, gather(key_cache), gather(value_cache), mask,
                                                                            0.0, !mask.has_value(), scale, heads != kv_heads);
        out.narrow(0, start, fresh).copy_(attended.select(0, 0).transpose(0, 1));
    }
    return out.unsqueeze(0);
}

// Llama's RMSNorm over the last dimension of float32 x, rounded as the model's
// own float32 code rounds it: weight * (x * rsqrt(mean(x * x) + eps)). This
// file is built without FMA, so no product is fused into a sum.
// One row of rms_norm: out = weight * (row * inverse), inverse =
// 1 / sqrt(mean(row * row) + eps).
inline void norm_row(const float* row, const float* weight, int64_t H, float eps, float* out) {
    float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= H; i += 8)
        for (int j = 0; j < 8; ++j) partial[j] += row[i + j] * row[i + j];
    float sum = 0;
    for (; i < H; ++i) sum += row[i] * row[i];
    for (int j = 0; j < 8; ++j) sum += partial[j];
    const float inverse = 1.0f / std::sqrt(sum / static_cast<float>(H) + eps);
    for (int64_t c = 0; c < H; ++c) out[c] = weight[c] * (row[c] * inverse);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
    const char* op = "rms_norm";
    const int64_t H = weight.numel();
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.is_contiguous(), op,
                ": weight must be contiguous float32 [H]");
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == H, op, ": x must be float32 [..., ", H, "]");
    const at::Tensor input = x.contiguous();
    at::Tensor out = at::empty_like(input);
    const int64_t rows = H > 0 ? input.numel() / H : 0;
    const float* xd = input.data_ptr<float>();
    const float* wd = weight.data_ptr<float>();
    float* od = out.data_ptr<float>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) norm_row(xd + r * H, wd, H, static_cast<float>(eps), od + r * H);
    });
    return out;
}

// llama_layers' residual adds with the norm that follows each: sum = a + b
// and rms_norm(sum, weight, eps) in one pass, the values of at::add and
// rms_norm to the bit (one rounding per sum, then the same norm), without
// two ops' dispatch and allocations per add (a few microseconds each at one
// row, four a layer). a and b: float32 [..., H], contiguous, same shape.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& weight, double eps) {
    const char* op = "add_rms_norm";
    const int64_t H = weight.numel();
    TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.sizes() == b.sizes() && a.is_contiguous() &&
                    b.is_contiguous() && a.size(-1) == H && weight.is_contiguous(),
                op, ": a and b must be contiguous float32 [..., ", H, "] of one shape");
    at::Tensor sum = at::empty_like(a), out = at::empty_like(a);
    const int64_t rows = H > 0 ? a.numel() / H : 0;
    const float *ad = a.data_ptr<float>(), *bd = b.data_ptr<float>(), *wd = weight.data_ptr<float>();
    float *sd = sum.data_ptr<float>(), *od = out.data_ptr<float>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            float* row = sd + r * H;
            for (int64_t c = 0; c < H; ++c) row[c] = ad[r * H + c] + bd[r * H + c];
            norm_row(row, wd, H, static_cast<float>(eps), od + r * H);
        }
    });
    return {sum, out};
}

// Llama's rotary embedding of one of query or key x [B, heads, T, D] (any
// strides, D contiguous) by cos, sin [B, T, D]: x * cos + rotate_half(x) * sin,
// each product rounded apart as the model's code rounds it (no FMA here), so
// the values are the model's own. The result is [B, heads, T, D] laid out as
// [B, T, heads, D], the layout of the projection it came from.
// One token's heads (head h at in + h * stride, D wide) rotated by its cos
// and sin (D each) into out [heads, D]: transformers' rotate_half form.
void rotate_heads(const float* in, int64_t stride, int64_t heads, int64_t D, const float* c, const float* s, float* out) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; ++h) {
        const float* x = in + h * stride;
        float* o = out + h * D;
        for (int64_t i = 0; i < half; ++i) {
            const float low = x[i], high = x[i + half];
            const float low_cos = low * c[i], high_sin = -high * s[i];
            const float high_cos = high * c[i + half], low_sin = low * s[i + half];
            o[i] = low_cos + high_sin;
            o[i + half] = high_cos + low_sin;
        }
    }
}

void check_cos_sin(const char* op, const at::Tensor& cos, const at::Tensor& sin, int64_t B, int64_t T, int64_t D) {
    for (const auto* t : {&cos, &sin})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == B && t->size(1) == T && t->size(2) == D &&
                        t->stride(2) == 1,
                    op, ": cos and sin must be float32 [", B, ", ", T, ", ", D, "] with the last dimension contiguous");
}

// f(bt, b, t, c, s) for each token bt = b * T + t of [B, T], c and s its
// rows of cos and sin [B, T, D], tokens split across the intra-op threads.
template <typename F>
void for_each_token(int64_t B, int64_t T, const at::Tensor& cos, const at::Tensor& sin, const F& f) {
    const float* cd = cos.data_ptr<float>();
    const float* sd = sin.data_ptr<float>();
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
        for (int64_t bt = begin; bt < end; ++bt) {
            const int64_t b = bt / T, t = bt % T;
            f(bt, b, t, cd + b * cos.stride(0) + t * cos.stride(1), sd + b * sin.stride(0) + t * sin.stride(1));
        }
    });
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    const char* op = "rotary";
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, op,
                ": query and key must be float32 [B, heads, T, D] with D even and contiguous");
    const int64_t B = x.size(0), heads = x.size(1), T = x.size(2), D = x.size(3);
    check_cos_sin(op, cos, sin, B, T, D);
    at::Tensor out = at::empty({B, T, heads, D}, x.options());
    const float* xd = x.data_ptr<float>();
    float* od = out.data_ptr<float>();
    for_each_token(B, T, cos, sin, [&](int64_t bt, int64_t b, int64_t t, const float* c, const float* s) {
        rotate_heads(xd + b * x.stride(0) + t * x.stride(2), x.stride(1), heads, D, c, s, od + bt * heads * D);
    });
    return out.transpose(1, 2);
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
    return {rotate(q, cos, sin), rotate(k, cos, sin)};
}

// A merged query | key | value projection's output qkv float32 [B, T, q_size
// + 2 kv_size] (D = head_dim contiguous) as the attention reads it: the query
// and key rotated as rotary() rotates them, the value copied, each [B, heads,
// T, D] laid out [B, T, heads, D]. One op where a split, three views, three
// transposes and rotary() were eleven (tens of microseconds a layer at one row).
std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rotary(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                                          int64_t head_dim, int64_t q_size, int64_t kv_size) {
    const char* op = "qkv_rotary";
    TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.dim() == 3 && qkv.stride(2) == 1 && head_dim > 0 && q_size % head_dim == 0 &&
                    kv_size % head_dim == 0 && qkv.size(2) == q_size + 2 * kv_size,
                op, ": qkv must be float32 [B, T, q_size + 2 kv_size] with its last dimension contiguous, in whole heads");
    const int64_t B = qkv.size(0), T = qkv.size(1), D = head_dim, q_heads = q_size / D, kv_heads = kv_size / D;
    TORCH_CHECK(D % 2 == 0, op, ": head_dim must be even");
    check_cos_sin(op, cos, sin, B, T, D);
    // Raw loops over one allocation each: the views, copies and dispatch of
    // doing this with tensor ops were most of a one-token call.
    at::Tensor query = at::empty({B, T, q_heads, D}, qkv.options());
    at::Tensor key = at::empty({B, T, kv_heads, D}, qkv.options());
    at::Tensor value = at::empty({B, T, kv_heads, D}, qkv.options());
    const float* in = qkv.data_ptr<float>();
    float* qd = query.data_ptr<float>();
    float* kd = key.data_ptr<float>();
    float* vd = value.data_ptr<float>();
    for_each_token(B, T, cos, sin, [&](int64_t bt, int64_t b, int64_t t, const float* c, const float* s) {
        const float* row = in + b * qkv.stride(0) + t * qkv.stride(1);
        rotate_heads(row, D, q_heads, D, c, s, qd + bt * q_size);
        rotate_heads(row + q_size, D, kv_heads, D, c, s, kd + bt * kv_size);
        std::memcpy(vd + bt * kv_size, row + q_size + kv_size, kv_size * sizeof(float));
    });
    return {query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)};
}

// silu(gate) * up over float32 tensors of one shape, as the model's
// act_fn(gate_proj(x)) * up_proj(x): silu(g) = g / (1 + exp(-g)).
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
    const char* op = "silu_mul";
    TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat && gate.sizes() == up.sizes(), op,
                ": gate and up must be float32 tensors of one shape");
    const at::Tensor g = gate.contiguous(), u = up.contiguous();
    at::Tensor out = at::empty_like(g);
    const float* gd = g.data_ptr<float>();
    const float* ud = u.data_ptr<float>();
    float* od = out.data_ptr<float>();
    at::parallel_for(0, g.numel(), 16384, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) od[i] = gd[i] / (1.0f + std::exp(-gd[i])) * ud[i];
    });
    return out;
}

// silu_mul over the halves of one merged gate | up projection's output
// gate_up float32 [..., 2 I]: [..., I], the same arithmetic, without the
// split and the two copies silu_mul would make of its strided halves.
at::Tensor silu_mul_halves(const at::Tensor& gate_up) {
    const char* op = "silu_mul_halves";
    TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, op,
                ": gate_up must be a float32 tensor whose last dimension is even");
    const at::Tensor x = gate_up.contiguous();
    const int64_t I = x.size(-1) / 2;
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = I;
    at::Tensor out = at::empty(sizes, x.options());
    const float* xd = x.data_ptr<float>();
    float* od = out.data_ptr<float>();
    // Row by row: an integer division per value (its row and column) was
    // most of a one-row call.
    const int64_t rows = I > 0 ? out.numel() / I : 0;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* gate = xd + r * 2 * I;
            const float* up = gate + I;
            float* o = od + r * I;
            for (int64_t c = 0; c < I; ++c) {
                const float g = gate[c];
                o[c] = g / (1.0f + std::exp(-g)) * up[c];
            }
        }
    });
    return out;
}

// One linear of llama_layers: ints bits, act_bits, out_features, isa,
// gemm_from_rows. act_bits 32: float activations, int8_linear over int8 q
// [N, K] with its scales and offsets (GGUF's Q6_K, in groups of 16).
at::Tensor layer_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets,
                        const c10::optional<at::Tensor>& bias, const int64_t* i) {
    if (i[1] == 32) return int8_linear(x, codes, scales, offsets, bias, i[3], i[4]);
    return int_linear(x, codes, scales, offsets, bias, i[0], i[1], i[2], i[3]);
}

// Consecutive Llama decoder layers of an eager step, L of them (L =
// key_caches.size()): the calls model_runtime.fused's Python layer makes, in
// its order, from one call instead of about twenty a layer (each torch op
// called from Python costs a few microseconds before it runs, and the Python
// around them as much again: most of a one-row step on a slow core). hidden
// float32 [1, T, H]. Per layer l: weights[14 l ...]: the input norm's weight,
// merged q|k|v (codes, scales, offsets), o, the post-attention norm's
// weight, merged gate|up, down; biases[4 l ...]: q|k|v, o, gate|up, down
// (None where unbiased); ints[kLayerInts l ...]: per linear (q|k|v, o,
// gate|up, down) layer_linear's five, then head_dim, q_size, kv_size;
// floats[3 l ...]: the two norms' eps and the attention's scale. window,
// softcap (0: none) and sinks are every layer's.
constexpr int64_t kLinearInts = 5, kLayerInts = 4 * kLinearInts + 3;

at::Tensor llama_layers(const at::Tensor& hidden, at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& biases,
                        at::IntArrayRef ints, at::ArrayRef<double> floats, const at::Tensor& cos, const at::Tensor& sin,
                        at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& metadata, int64_t window,
                        double softcap, const c10::optional<at::Tensor>& sinks) {
    const char* op = "llama_layers";
    const int64_t L = static_cast<int64_t>(key_caches.size());
    TORCH_CHECK(static_cast<int64_t>(value_caches.size()) == L && static_cast<int64_t>(weights.size()) == 14 * L &&
                    static_cast<int64_t>(biases.size()) == 4 * L && static_cast<int64_t>(ints.size()) == kLayerInts * L &&
                    static_cast<int64_t>(floats.size()) == 3 * L,
                op, ": per layer 14 weights, 4 biases, ", kLayerInts, " ints, 3 floats and a key and value cache");
    TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 3, op, ": hidden must be float32 [B, T, H]");
    at::Tensor x = hidden.contiguous();
    at::Tensor normed = L > 0 ? rms_norm(x, weights[0], floats[0]) : x;  // each layer's input norm, fused below with the add before it
    for (int64_t l = 0; l < L; ++l) {
        const at::Tensor* w = weights.data() + 14 * l;
        const int64_t* n = ints.data() + kLayerInts * l;
        const double* f = floats.data() + 3 * l;
        const auto linear = [&](const at::Tensor& input, int which) {  // which: 0 q|k|v, 1 o, 2 gate|up, 3 down
            constexpr int codes[] = {1, 4, 8, 11};  // the post-attention norm's weight sits between o and gate|up
            const int c = codes[which];
            return layer_linear(input, w[c], w[c + 1], w[c + 2], biases.get(4 * l + which), n + kLinearInts * which);
        };
        const int64_t head_dim = n[4 * kLinearInts], q_size = n[4 * kLinearInts + 1], kv_size = n[4 * kLinearInts + 2];
        auto [query, key, value] = qkv_rotary(linear(normed, 0), cos, sin, head_dim, q_size, kv_size);
        const at::Tensor attention =
            paged_attention_step(query, key, value, key_caches[l], value_caches[l], metadata, f[2], window, softcap, sinks);
        auto [attended, post] = add_rms_norm(x, linear(attention.reshape({x.size(0), x.size(1), -1}).contiguous(), 1), w[7], f[1]);
        const at::Tensor down = linear(silu_mul_halves(linear(post, 2)), 3);
        if (l + 1 < L)
            std::tie(x, normed) = add_rms_norm(attended, down, weights[14 * (l + 1)], floats[3 * (l + 1)]);
        else
            x = at::add(attended, down);
    }
    return x;
}

}  // namespace

TORCH_LIBRARY(tokenstep, m) {
    m.def("isas() -> str[]", &isas);
    m.def("int8_linear(Tensor x, Tensor q, Tensor scales, Tensor offsets, Tensor? bias, int isa=-1, int gemm_from_rows=0) -> Tensor");
    m.impl("int8_linear", c10::DispatchKey::CPU, TORCH_FN(int8_linear));
    m.def("int8_dequantize(Tensor q, Tensor scales, Tensor offsets, int isa=-1) -> Tensor");
    m.impl("int8_dequantize", c10::DispatchKey::CPU, TORCH_FN(int8_dequantize));
    m.def("int4_linear(Tensor x, Tensor q, Tensor scales, Tensor offsets, Tensor? bias, int isa=-1, int gemm_from_rows=0) -> Tensor");
    m.impl("int4_linear", c10::DispatchKey::CPU, TORCH_FN(int4_linear));
    m.def("int4_dequantize(Tensor q, Tensor scales, Tensor offsets, int isa=-1) -> Tensor");
    m.impl("int4_dequantize", c10::DispatchKey::CPU, TORCH_FN(int4_dequantize));
    m.def("int_linear(Tensor x, Tensor codes, Tensor scales, Tensor offsets, Tensor? bias, int bits, int act_bits, int out_features, int isa=-1) -> Tensor");
    m.impl("int_linear", c10::DispatchKey::CPU, TORCH_FN(int_linear));
    m.def("paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor context_lens, float scale, int isa=-1, int window=0, float softcap=0.0, Tensor? sinks=None) -> Tensor");
    m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
    m.def("paged_attention_step(Tensor query, Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor metadata, float scale, int window=0, float softcap=0.0, Tensor? sinks=None) -> Tensor");
    m.impl("paged_attention_step", c10::DispatchKey::CPU, TORCH_FN(paged_attention_step));
    m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
    m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
    m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
    m.impl("rotary", c10::DispatchKey::CPU, TORCH_FN(rotary));
    m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
    m.impl("silu_mul", c10::DispatchKey::CPU, TORCH_FN(silu_mul));
    m.def("silu_mul_halves(Tensor gate_up) -> Tensor");
    m.impl("silu_mul_halves", c10::DispatchKey::CPU, TORCH_FN(silu_mul_halves));
    m.def("qkv_rotary(Tensor qkv, Tensor cos, Tensor sin, int head_dim, int q_size, int kv_size) -> (Tensor, Tensor, Tensor)");
    m.impl("qkv_rotary", c10::DispatchKey::CPU, TORCH_FN(qkv_rotary));
    m.def("write_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
    m.impl("write_kv_cache", c10::DispatchKey::CPU, TORCH_FN(write_kv_cache));
    m.def("llama_layers(Tensor hidden, Tensor[] weights, Tensor?[] biases, int[] ints, float[] floats, Tensor cos, Tensor sin, "
          "Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, Tensor metadata, int window=0, float softcap=0.0, Tensor? sinks=None) -> Tensor");
    m.impl("llama_layers", c10::DispatchKey::CPU, TORCH_FN(llama_layers));
}
