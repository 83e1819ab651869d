"""Encoder-decoder throughput: ``tokenstep serve`` (``tokenstep bench``, 1/16/64
in flight) against ``model.generate`` with a static batch of the same size,
the only offline peer (vLLM's v1 engine and llama.cpp's server serve no
BART). Sources of ``--input-len`` random tokens, ``--output-len`` tokens each,
EOS ignored. Without ``--model-dir`` a BART is built with random weights
(``--size tiny``: the tests' 2-layer d_model 64; ``base``: bart-base's shape).

    .venv/bin/python benchmarks/encoder_decoder.py --size base --out benchmarks/results/encdec   # -> .../encdec/base/
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_model(size: str, target: Path) -> Path:
    from model_runtime.loading.default_model import default_model_dir
    from tests.tiny_models import _widen, build_tiny_bart

    if size == "tiny":
        return build_tiny_bart(target, default_model_dir())
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=49152,
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    # Wide random weights, so the text is not one special token repeated (a stream of no text).
    _widen(BartForConditionalGeneration(config).eval(), 0.1).save_pretrained(target)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(target)
    return target


def generate_throughput(model_dir: Path, batch: int, input_len: int, output_len: int, repeats: int) -> float:
    """Output tokens per second of ``model.generate`` on static batches of ``batch`` sources."""
    torch.manual_seed(1)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sources = torch.randint(3, model.config.vocab_size, (batch, input_len))
    settings = dict(
        do_sample=False,
        num_beams=1,
        max_new_tokens=output_len,
        min_new_tokens=output_len,
        eos_token_id=None,
        forced_eos_token_id=None,
        forced_bos_token_id=None,
    )
    with torch.inference_mode():
        model.generate(sources[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model.generate(sources, attention_mask=torch.ones_like(sources), **settings)
        elapsed = time.perf_counter() - start
    return batch * output_len * repeats / elapsed


CLI = "from server.cli import main; main()"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tokenstep_throughput(model_dir: Path, levels: list[int], input_len: int, output_len: int, out: Path) -> dict[int, dict]:
    """``tokenstep bench`` against a served model at each level (4x the level in prompts, at least 8)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-c", CLI, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        start_new_session=True,
        stdout=open(out / "server.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        results = {}
        for level in levels:
            result_json = out / f"tokenstep-c{level}.json"
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CLI,
                    "bench",
                    "--base-url",
                    base,
                    "--input-len",
                    str(input_len),
                    "--output-len",
                    str(output_len),
                    "--ignore-eos",
                    "--num-prompts",
                    str(max(4 * level, 8)),
                    "--max-concurrency",
                    str(level),
                    "--result-json",
                    str(result_json),
                    "--no-progress",
                    "--label",
                    f"tokenstep c{level}",
                ],
                check=True,
            )
            results[level] = json.loads(result_json.read_text())
        return results
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encdec"))
    args = parser.parse_args()
    args.out = args.out / (args.model_dir.name if args.model_dir else args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [int(level) for level in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or build_model(args.size, Path(scratch) / f"bart-{args.size}")
        served = tokenstep_throughput(model_dir, levels, args.input_len, args.output_len, args.out)
        rows = []
        for level in levels:
            static = generate_throughput(model_dir, level, args.input_len, args.output_len, repeats=max(4 // level, 1))
            metrics = served[level]
            tokenstep_tps = metrics["output_throughput"]
            rows.append({"in_flight": level, "tokenstep_tok_s": tokenstep_tps, "generate_tok_s": static, "ratio": tokenstep_tps / static})
            print(
                f"{level:>3} in flight: tokenstep {tokenstep_tps:8.1f} tok/s, generate (static batch) {static:8.1f} "
                f"tok/s, {tokenstep_tps / static:.2f}x",
                flush=True,
            )
    (args.out / "summary.json").write_text(
        json.dumps({"size": args.size, "input_len": args.input_len, "output_len": args.output_len, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
