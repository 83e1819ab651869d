"""Write a layer-truncated copy of a model, for ``--speculative-model``.

    .venv/bin/python benchmarks/make_layer_draft.py OUT_DIR [--model DIR] [--layers 8]

Keeps the first ``--layers`` decoder layers, the final norm and the LM head
("early exit" self-speculation, as in LayerSkip or Draft & Verify, without
their training): a draft with the served model's vocabulary and tokenizer
when no smaller sibling model is at hand (the default SmolLM2-135M has none
offline). Its acceptance rate is whatever an untrained early exit gives;
docs/PERFORMANCE.md has the measurement.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_runtime.loading.default_model import default_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--model", default=None, help="source HF directory (default: the embedded SmolLM2)")
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    source = args.model or str(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    decoder = model.get_decoder()
    decoder.layers = decoder.layers[: args.layers]
    model.config.num_hidden_layers = args.layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[: args.layers]
    model.save_pretrained(args.out_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(args.out_dir)
    print(f"{args.out_dir}: first {args.layers} layers of {source}")


if __name__ == "__main__":
    main()
