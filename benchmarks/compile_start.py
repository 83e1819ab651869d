"""Where a ``--compile`` start goes: build the default model's engine with
the step forward compiled, as ``tokenstep serve --compile`` does, and print
how long it took with dynamo's own timers and counters.

    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache .venv/bin/python benchmarks/compile_start.py

Run it twice with the same (at first empty) cache folder: the first run is a
first start, the second a later one. ``compile_attempt_1`` in the timers
means dynamo threw its first trace away and traced again; ``bytecode_tracing``
is the model's Python, traced at every start whatever the cache holds.
"""

import logging
import time

import torch._dynamo.utils as dynamo_utils

from server.engine_builder import build_engine_core, engine_config
from server.settings import Settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    build_engine_core(engine_config(Settings(compile=True)))
    print(f"engine built in {time.perf_counter() - start:.1f} s")
    print(dynamo_utils.compile_times(repr="str"))
    counters = dynamo_utils.counters
    print({name: dict(counters[name]) for name in ("stats", "aot_autograd", "inductor") if name in counters})


if __name__ == "__main__":
    main()
