"""sentence-transformers encoding the inputs ``tokenstep bench --endpoint
embeddings`` sends, in one process: the in-process baseline for the
embeddings table in docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/embeddings_compare.py MODEL_DIR [--num-prompts 256] [--input-len 128] [--seed 0] [--batch-size 32]

The texts are ``bench.datasets.random_text_prompts`` with the bench's own
arguments and the tokens-per-word ``tokenstep bench`` measures through the
server's ``/tokenize`` (the same tokenizer, without special tokens), so both
sides embed the same strings. Prints inputs per second and input tokens per
second (special tokens included, as the server's ``usage`` counts them),
best of ``--repeats`` timed passes after one warm-up pass.
"""

import argparse
import time

import torch
from sentence_transformers import SentenceTransformer

from bench.datasets import SAMPLE_TEXT, random_text_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers' encode batch size (its default: 32)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = SentenceTransformer(args.model_dir, device="cpu")
    tokens_per_word = len(model.tokenizer(SAMPLE_TEXT, add_special_tokens=False).input_ids) / len(SAMPLE_TEXT.split())
    texts = [prompt.prompt for prompt in random_text_prompts(args.num_prompts, args.input_len, 1, args.seed, tokens_per_word)]
    limit = model.max_seq_length
    num_tokens = sum(min(len(model.tokenizer(text).input_ids), limit) for text in texts)
    model.encode(texts, batch_size=args.batch_size)
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.encode(texts, batch_size=args.batch_size)
        seconds.append(time.perf_counter() - start)
    best = min(seconds)
    print(
        f"sentence-transformers, batch {args.batch_size}, torch threads {torch.get_num_threads()}: {len(texts)} inputs, "
        f"{num_tokens} tokens in {best:.2f} s (best of {args.repeats}): {len(texts) / best:.1f} inputs/s, {num_tokens / best:.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
