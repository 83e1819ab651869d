"""``tokenstep`` command line: ``tokenstep serve [MODEL] [--flags]``.

Each flag defaults to ``TOKENSTEP_<FLAG>`` from the environment, then to the
``Settings`` default; a flag given on the command line wins.
"""

import argparse
import logging
import sys
from pathlib import Path

from server.settings import Settings


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="HF model directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api-key")
    parser.add_argument("--served-model-name")
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help=(
            "token budget of one step (default on CPU: 128, or 8 per running request when more; 2048 on CUDA); "
            "an encoder-decoder model's sources count whole, and one longer than the budget runs in a step of "
            "its own"
        ),
    )
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--kv-cache-memory", help="e.g. 512MiB, 2GiB or bytes")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument(
        "--quantization",
        choices=["none", "int8", "gguf"],
        help=(
            "int8: weight-only int8 linears; gguf: a GGUF model's own Q4_0/Q4_1/Q8_0 weights (both CPU; float32 "
            "activations unless --activations; default none)"
        ),
    )
    parser.add_argument(
        "--activations",
        choices=["float32", "int16", "int8"],
        help=(
            "int16 / int8 (with --quantization gguf or int8): quantize the linears' inputs per group of 32 too, "
            "for integer dot products; int16 stays close to float32's outputs, int8 (as llama.cpp) moves them "
            "more (default float32)"
        ),
    )
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the step forward whole (torch.compile): shorter steps, 1-2 minutes more at start (default off)",
    )
    parser.add_argument("--chat-template", help="Jinja chat template file overriding the model's")
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        help="speculative decoding: draft tokens per greedy request per step (default 0 = off; 4 with --speculative-model)",
    )
    parser.add_argument(
        "--speculative-model",
        help="draft model with the served model's vocabulary (HF directory or hub id); without it drafts come from n-gram lookup",
    )
    parser.add_argument("--max-request-bytes", type=int)
    parser.add_argument("--max-queue-len", type=int, help="most requests waiting to run; more get 503 (default 256)")
    parser.add_argument(
        "--max-stored-responses", type=int, help="responses kept in memory for previous_response_id (LRU; default 1024; 0 = none)"
    )
    parser.add_argument("--request-timeout", type=float, help="seconds before a request ends with 504 (default: no limit)")
    parser.add_argument("--shutdown-timeout", type=float, help="on SIGTERM, seconds in-flight requests may finish (default 30)")
    parser.add_argument("--allowed-origins", help="comma-separated CORS origins (default: CORS off)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def parse_settings(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser(prog="tokenstep serve")
    _add_serve_flags(parser)
    args = parser.parse_args(argv)
    given = {key: value for key, value in vars(args).items() if value is not None}
    return Settings(**given)


def make_loader(settings: Settings):
    """Return the callable that builds the engine (run in a thread at start-up)."""

    def load():
        from batching.engine import DynamicBatcher
        from model_runtime.loading.default_model import DEFAULT_MODEL_NAME, default_gguf_file, default_model_dir
        from server.engine_builder import EngineConfig, build_engine_core
        from server.state import Served

        model = settings.model or default_model_dir()
        default_name = DEFAULT_MODEL_NAME if settings.model is None else Path(str(model).rstrip("/")).name
        config = EngineConfig(
            model=model,
            dtype=settings.dtype,
            device=settings.device,
            quantization=settings.quantization,
            gguf_file=default_gguf_file() if settings.model is None and settings.quantization == "gguf" else None,
            activations=settings.activations,
            block_size=settings.block_size,
            kv_cache_memory=settings.kv_cache_memory,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enable_prefix_caching=settings.enable_prefix_caching,
            max_model_len=settings.max_model_len,
            num_speculative_tokens=settings.num_speculative_tokens,
            speculative_model=settings.speculative_model,
            compile=settings.compile,
        )
        chat_template = Path(settings.chat_template).read_text() if settings.chat_template else None
        core = build_engine_core(config)
        name = settings.served_model_name or default_name
        return Served(DynamicBatcher(core, settings.max_queue_len), core.tokenizer, name, core.max_model_len, str(model), chat_template)

    return load


def serve(settings: Settings) -> None:
    from server.app import create_app
    from server.shutdown import run_until_drained

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = "localhost" if settings.host in ("0.0.0.0", "::", "127.0.0.1") else settings.host
    logging.getLogger("tokenstep").info(
        "once the model is loaded: playground at http://%s:%d/ , live dashboard at http://%s:%d/dashboard",
        host,
        settings.port,
        host,
        settings.port,
    )
    app = create_app(settings, load=make_loader(settings))
    run_until_drained(app, settings)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: tokenstep serve [MODEL] [--flags] | tokenstep bench --base-url URL [--flags]   (tokenstep COMMAND --help for flags)")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve(parse_settings(rest))
    elif command == "bench":
        from bench.cli import main as bench_main

        sys.exit(bench_main(rest))
    else:
        print(f"tokenstep: unknown command {command!r}; try 'tokenstep serve --help' or 'tokenstep bench --help'", file=sys.stderr)
        sys.exit(2)
