"""Every causal-LM architecture of the installed transformers, tried as a new
user would: a tiny random model built from its config class, loaded by
tokenstep (the load-time check, ``model_runtime.attention.check``, serves it or
refuses it), and where served, concurrent greedy completions compared with
``model.generate`` on each prompt alone.

    .venv/bin/python benchmarks/architecture_survey.py --out survey.md [model_type ...]

Each architecture runs in a child process of its own, with a memory cap and a
time limit: some config classes ignore the tiny sizes asked for and build a
multi-GB model, which then fails alone. What is printed, per model type:
``served k/n`` (k of n prompts identical), ``refused: <the load line>``,
``not built: <why>`` (the config class needs more than the common
arguments), ``load error`` or ``crashed``. docs/MODELS.md holds a run's table.
A served row below n/n is a defect of tokenstep's (the check let through a
model it serves wrongly): look at it first.
"""

import argparse
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

TIMEOUT_S = 150
MEMORY_CAP_BYTES = 12 * 2**30
PROMPT_LENGTHS = (1, 5, 23, 30, 60, 100)
MAX_TOKENS = 16
SLIDING_WINDOW = 24  # set where the config class has a sliding_window
SURVEY_VOCAB_SIZE = 1024  # the tests' tiny shape (tests/tiny_models.py) with a smaller vocabulary


def survey_one(model_type: str, work_dir: Path) -> str:
    """Build, load and compare one architecture (runs in the child)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from model_runtime.attention.check import UnsupportedModelError
    from model_runtime.loading.default_model import default_model_dir
    from model_runtime.loading.loader import load_model
    from server.engine_builder import EngineConfig, build_engine_core
    from tests.model_runtime.test_parity import reference_outputs, run_engine
    from tests.tiny_models import TINY_DECODER

    tiny = dict(TINY_DECODER, vocab_size=SURVEY_VOCAB_SIZE)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir = work_dir / model_type
    try:
        settings = dict(tiny)
        if hasattr(AutoConfig.for_model(model_type), "sliding_window"):
            settings["sliding_window"] = SLIDING_WINDOW
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).eval().save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(model_dir)
    except Exception as error:
        return f"not built: {type(error).__name__}: {_first_line(error)}"
    try:
        loaded = load_model(model_dir, dtype="float32", device="cpu")
    except UnsupportedModelError as error:
        return f"refused: {error}"
    except Exception as error:
        return f"load error: {type(error).__name__}: {_first_line(error)}"
    rng = random.Random(0)
    prompts = [[rng.randrange(3, SURVEY_VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENGTHS]
    try:
        expected = reference_outputs(model_dir, prompts, lambda _: MAX_TOKENS)
        core = build_engine_core(EngineConfig(model="unused", num_kv_blocks=256, max_num_batched_tokens=40), loaded)
        got = run_engine(core, prompts, max_tokens_of=lambda _: MAX_TOKENS)
    except Exception as error:
        return f"served, run failed: {type(error).__name__}: {_first_line(error)}"
    # generate stops at the config's EOS (2); the engine ignores EOS: compare up to there.
    same = sum(g == e or (e[-1:] == [tiny["eos_token_id"]] and g[: len(e)] == e) for g, e in zip(got, expected))
    return f"served {same}/{len(prompts)}"


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [""])[0][:160]


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="default: every causal-LM model type of the installed transformers")
    parser.add_argument("--out", type=Path, help="also write a Markdown table here")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tokenstep-architecture-survey"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT", survey_one(args.child, args.work_dir), flush=True)
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    rows = []
    for model_type in args.model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        command = [sys.executable, __file__, "--child", model_type, "--work-dir", str(args.work_dir)]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                preexec_fn=_limit_memory,
                env=dict(os.environ, HF_HUB_OFFLINE="1"),
            )
            results = [line.removeprefix("RESULT ") for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            result = results[-1] if results else f"crashed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            result = f"timed out after {TIMEOUT_S} s"
        print(f"{model_type}: {result}", flush=True)
        rows.append((model_type, result))
    if args.out:
        lines = ["| model type | result |", "|---|---|", *(f"| `{t}` | {r.replace('|', '/')} |" for t, r in rows)]
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
