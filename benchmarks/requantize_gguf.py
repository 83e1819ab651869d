"""Write a K-quant GGUF of a model from another GGUF file, to measure how
tokenstep serves K-quant files where no real one is at hand (no model hub,
and llama.cpp's ``llama-quantize`` only where ``benchmarks/setup_peers.sh``
built it).

    .venv/bin/python benchmarks/requantize_gguf.py OUT.gguf [--source IN.gguf]

The mix follows llama.cpp's Q4_K_M in kind: Q4_K for the attention
projections and the MLP's gate and up, Q6_K for the value and down
projections and the token embedding (the tied head). The values come from
the source's own dequantized tensors (the embedded model's Q4_1 file by
default), re-quantized by the small quantizers of ``tests/tiny_gguf.py`` (and
gguf's own for Q5_0 and Q8_0, the fallbacks where a row is not whole
super-blocks, as llama.cpp falls back): a
file of the right types and sizes for speed and memory, not a good Q4_K_M
(use ``llama-quantize`` from the float model for quality numbers).
"""

import argparse
from pathlib import Path

import gguf
import numpy as np

from model_runtime.loading.default_model import default_gguf_file
from tests.tiny_gguf import quantize_k, quantize_q6_k

# GGUF tensor name fragment -> type; others keep their own type (norms: F32).
MIX = {
    "attn_q.": "Q4_K",
    "attn_k.": "Q4_K",
    "attn_output.": "Q4_K",
    "ffn_gate.": "Q4_K",
    "ffn_up.": "Q4_K",
    "attn_v.": "Q6_K",
    "ffn_down.": "Q6_K",
    "token_embd.": "Q6_K",
}

# Where a row is not a whole number of 256-weight super-blocks (SmolLM2's
# hidden size is 576), llama.cpp's quantizer falls back to a 32-weight type.
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def requantize(source: Path, target: Path) -> dict[str, int]:
    reader = gguf.GGUFReader(str(source))
    architecture = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target), architecture)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        rows, columns = int(np.prod(tensor.shape[1:])), int(tensor.shape[0])  # GGUF shapes list the row length first
        kind = next((kind for fragment, kind in MIX.items() if fragment in tensor.name), None)
        if kind is None:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
            continue
        if columns % 256:  # rows that are not whole super-blocks: llama.cpp's fallback types
            kind = FALLBACK[kind]
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, columns)
        if kind == "Q6_K":
            blocks = quantize_q6_k(weights)
        elif kind in ("Q4_K", "Q5_K"):
            blocks = quantize_k(weights, kind)
        else:
            blocks = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[kind])
        writer.add_tensor(tensor.name, blocks, raw_dtype=gguf.GGMLQuantizationType[kind])
        counts[kind] = counts.get(kind, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, default=None, help="default: the embedded model's GGUF file")
    args = parser.parse_args()
    counts = requantize(args.source or default_gguf_file(), args.out)
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB, tensors {counts}")


if __name__ == "__main__":
    main()
