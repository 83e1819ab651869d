"""``tokenstep bench``: flags, then probe → prompts → run(s) → table, JSON, plot.

Works against any OpenAI-compatible server (tokenstep, vLLM, llama.cpp,
``transformers serve``, ...). ``--concurrency-sweep 1,4,16`` repeats the same
prompts once per level. ``--max-duration`` bounds the whole command: each run
gets what is left of it, and a run that gets nothing reports all its requests
failed with ``"deadline"``.

Exit status: 0 when every run completed at least one request; 1 when some run
completed none (server down, wrong model, ...): the table and JSON are still
written and failures are listed, never raised; 2 for bad flags or dataset.
"""

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.client import ServerProbe, Target, probe_server, server_root
from bench.datasets import BenchPrompt, load_jsonl_prompts, random_text_prompts, random_token_prompts
from bench.report import BenchRun, format_run_table, format_sweep_table, json_value, plot_runs, write_result_json
from bench.runner import run_requests
from bench.stats import compute_metrics

DEFAULT_MAX_DURATION_S = 1800.0


def build_parser() -> argparse.ArgumentParser:
    """The ``tokenstep bench`` argument parser (flags spelled as ``vllm bench serve``)."""
    parser = argparse.ArgumentParser(prog="tokenstep bench", description="Load-test an OpenAI-compatible server.")
    parser.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is dropped)")
    parser.add_argument("--model", help="model name (default: the first id from GET /v1/models)")
    parser.add_argument(
        "--endpoint",
        choices=["completions", "chat", "embeddings"],
        default="completions",
        help="embeddings: one text input per /v1/embeddings request (--output-len unused)",
    )
    parser.add_argument("--dataset", default="random", help='\'random\' or a JSONL file of {"prompt": text|ids, "output_len"?: int}')
    parser.add_argument("--input-len", type=int, default=128, help="random prompt length in tokens (default 128)")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens per request (default 128)")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per run (default 64)")
    levels = parser.add_mutually_exclusive_group()
    levels.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: no cap)")
    levels.add_argument("--concurrency-sweep", type=_int_list, help="comma-separated levels, e.g. 1,4,16,64: one run each")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per s (default inf: all at once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true so every request makes output-len tokens")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--extra-body", type=_json_object, help='JSON merged into request bodies, e.g. \'{"guided_choice": ["a", "b"]}\'')
    parser.add_argument(
        "--extra-body-fraction", type=float, default=1.0, help="share of requests (spread evenly) that get --extra-body (default 1)"
    )
    parser.add_argument("--result-json", type=Path, help="write metrics and config here (a list for a sweep)")
    parser.add_argument("--plot", type=Path, help="PNG: latency CDF (one run) or curves vs concurrency (sweep)")
    parser.add_argument("--label", default="", help="name of this server/config in the table, JSON and plot")
    parser.add_argument(
        "--max-duration", type=float, default=DEFAULT_MAX_DURATION_S, help="hard bound on the whole bench in s (default 1800)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return values


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check flags; exits with status 2 on a bad combination."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("input_len", "output_len", "num_prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    if not args.base_url.startswith(("http://", "https://")):
        parser.error("--base-url must start with http:// or https://")
    if args.request_rate <= 0 or args.max_duration <= 0:
        parser.error("--request-rate and --max-duration must be positive")
    if not 0 <= args.extra_body_fraction <= 1:
        parser.error("--extra-body-fraction must be in [0, 1]")
    return args


def with_extra_body(prompts: list[BenchPrompt], extra_body: dict[str, Any] | None, fraction: float) -> list[BenchPrompt]:
    """Give ``extra_body`` to ``floor(len(prompts) * fraction)`` prompts, evenly spread."""
    if not extra_body:
        return prompts
    return [
        dataclasses.replace(p, extra_body=extra_body) if int((i + 1) * fraction) > int(i * fraction) else p for i, p in enumerate(prompts)
    ]


def make_prompts(args: argparse.Namespace, probe: ServerProbe) -> tuple[list[BenchPrompt], str]:
    """The prompts of every run and their format (``"token_ids"`` or ``"text"``)."""
    if args.dataset != "random":
        prompts = load_jsonl_prompts(Path(args.dataset), args.num_prompts, args.output_len, probe.tokens_per_word)
        if args.endpoint == "chat" and any(p.is_token_ids for p in prompts):
            raise ValueError("the chat endpoint needs text prompts, the dataset has token ids")
        return prompts, "token_ids" if prompts[0].is_token_ids else "text"
    if args.endpoint == "completions" and probe.vocab_ids:
        return random_token_prompts(probe.vocab_ids, args.num_prompts, args.input_len, args.output_len, args.seed), "token_ids"
    return random_text_prompts(args.num_prompts, args.input_len, args.output_len, args.seed, probe.tokens_per_word), "text"


def run_config(args: argparse.Namespace, target: Target, concurrency: int | None, prompt_format: str) -> dict[str, Any]:
    """The per-run configuration recorded in the JSON."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "label": args.label,
        "base_url": target.base_url,
        "model": target.model,
        "endpoint": args.endpoint,
        "dataset": args.dataset,
        "prompt_format": prompt_format,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_prompts": args.num_prompts,
        "max_concurrency": concurrency,
        "request_rate": json_value(args.request_rate),
        "seed": args.seed,
        "ignore_eos": args.ignore_eos,
        "extra_body": args.extra_body,
        "extra_body_fraction": args.extra_body_fraction if args.extra_body else None,
    }


def run_all(args: argparse.Namespace, deadline_s: float) -> list[BenchRun]:
    """Probe the server, build prompts, then one run per concurrency level."""
    root = server_root(args.base_url)
    probe = probe_server(root, args.model, args.api_key)
    for note in probe.notes:
        print(f"tokenstep bench: {note}", file=sys.stderr)
    target = Target(root, args.endpoint, probe.model, args.api_key, args.ignore_eos)
    prompts, prompt_format = make_prompts(args, probe)
    prompts = with_extra_body(prompts, args.extra_body, args.extra_body_fraction)
    runs = []
    for concurrency in args.concurrency_sweep or [args.max_concurrency]:
        budget_s = deadline_s - time.monotonic()
        coroutine = run_requests(target, prompts, concurrency, args.request_rate, args.seed, budget_s, not args.no_progress)
        results, duration_s = asyncio.run(coroutine)
        run = BenchRun(run_config(args, target, concurrency, prompt_format), compute_metrics(results, duration_s), results)
        print(format_run_table(run), flush=True)
        runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run ``tokenstep bench`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    deadline_s = time.monotonic() + args.max_duration
    try:
        runs = run_all(args, deadline_s)
    except (OSError, ValueError) as exc:
        print(f"tokenstep bench: {exc}", file=sys.stderr)
        return 2
    is_sweep = args.concurrency_sweep is not None
    if is_sweep:
        print(format_sweep_table(runs))
    if args.result_json:
        write_result_json(args.result_json, runs, is_sweep)
    if args.plot:
        plot_runs(args.plot, runs, is_sweep)
    return 0 if all(run.metrics.completed > 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
