"""``tokenstep`` command line: ``tokenstep serve [MODEL] [--flags]``,
``tokenstep prepare`` and ``tokenstep bench``.

The flags are ``Settings``' fields, built from them; each defaults to
``TOKENSTEP_<FLAG>`` from the environment, then to the ``Settings`` default;
a flag given on the command line wins.
"""

import argparse
import logging
import sys
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin

from server.settings import Settings


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``Settings`` field (``model`` is the positional), its
    type, choices and help taken from the field: nothing restated here.
    Unset flags stay None, so the environment and the defaults apply."""
    for name, field in Settings.model_fields.items():
        kind = field.annotation
        if get_origin(kind) in (Union, UnionType):  # X | None: the flag takes an X
            kind = next(arg for arg in get_args(kind) if arg is not type(None))
        help_text = field.description or ""
        if field.default is not None and "default" not in help_text and name != "api_key":
            help_text += f" (default {field.default})"
        options: dict = {"default": None, "help": help_text.replace("%", "%%")}  # argparse formats help with %
        if get_origin(kind) is Literal:
            options["choices"] = get_args(kind)
        elif kind is bool:
            # --flag/--no-flag; a field already named no_* is one switch.
            options["action"] = "store_const" if name.startswith("no_") else argparse.BooleanOptionalAction
            if name.startswith("no_"):
                options["const"] = True
        else:
            options["type"] = kind
        if name == "model":
            parser.add_argument("model", nargs="?", **options)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", **options)


def parse_settings(argv: list[str], prog: str = "tokenstep serve") -> Settings:
    parser = argparse.ArgumentParser(prog=prog)
    _add_setting_flags(parser)
    args = parser.parse_args(argv)
    given = {key: value for key, value in vars(args).items() if value is not None}
    return Settings(**given)


def make_loader(settings: Settings):
    """Return the callable that builds the engine (run in a thread at start-up)."""

    def load():
        from batching.batcher import DynamicBatcher
        from server.engine_builder import build_engine_core, engine_config, model_path, served_model_name
        from server.state import Served

        config = engine_config(settings)
        chat_template = Path(settings.chat_template).read_text() if settings.chat_template else None
        core = build_engine_core(config)
        name = settings.served_model_name or served_model_name(config)
        batcher = DynamicBatcher(core, settings.max_queue_len)
        served = Served(
            batcher,
            core.tokenizer,
            name,
            core.max_model_len,
            str(model_path(config)),
            chat_template,
            settings.reasoning_parser,
            settings.tool_call_parser,
        )
        logger = logging.getLogger(__name__)
        logger.info(
            "tool calls: read and forced in the %s format (--tool-call-parser %s)", served.tool_format.name, settings.tool_call_parser
        )
        if served.reasoning is not None:
            logger.info(
                "reasoning: %s...%s blocks are split from answers (--reasoning-parser %s)",
                served.reasoning.start_tag,
                served.reasoning.end_tag,
                settings.reasoning_parser,
            )
        return served

    return load


def prepare(settings: Settings) -> None:
    """``tokenstep prepare``: build the kernels and convert the default model
    into the cache now, not at the first start (``make venv``, the image)."""
    from server.engine_builder import engine_config, prepare

    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s")
    print(prepare(engine_config(settings)))


# The GIL switch interval of a serving process (Python's default is 5 ms).
# The model thread's Python between the C++ ops, and its hand-off of each
# step's outputs, wait on the event loop's thread while that one formats and
# sends the streams: with 1 ms the model thread gets the GIL back sooner. Served
# default, alternating rounds (AMD EPYC Zen 3, 2 cores, 2026-12-07): one
# stream 107.5 / 118.2 -> 116.9 / 127.1 tok/s, 16 in flight 212.5 / 225.3 ->
# 226.4 / 231.4 tok/s (docs/PERFORMANCE.md).
SWITCH_INTERVAL_S = 0.001


def serve(settings: Settings) -> None:
    from server.app import create_app
    from server.shutdown import run_until_drained

    sys.setswitchinterval(SWITCH_INTERVAL_S)

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
        print(
            "usage: tokenstep serve [MODEL] [--flags] | tokenstep prepare [--cache-dir DIR] | tokenstep bench --base-url URL [--flags]"
            "   (tokenstep COMMAND --help for flags)"
        )
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve(parse_settings(rest))
    elif command == "prepare":
        prepare(parse_settings(rest, prog="tokenstep prepare"))
    elif command == "bench":
        from bench.cli import main as bench_main

        sys.exit(bench_main(rest))
    else:
        print(f"tokenstep: unknown command {command!r}; try 'tokenstep serve --help' or 'tokenstep bench --help'", file=sys.stderr)
        sys.exit(2)
