"""``tokenstep bench`` against a live tokenstep serving the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main as bench_main
from tests.e2e.conftest import ServerProcess, free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG_FIELDS = {"label", "base_url", "model", "endpoint", "input_len", "output_len", "num_prompts", "max_concurrency", "request_rate"}
METRIC_FIELDS = {
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "errors",
    *(f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p90", "p99")),
}


def run_bench(server_url: str, tmp_path: Path, *flags: str) -> tuple[int, dict | list]:
    result_json = tmp_path / "result.json"
    status = bench_main(["--base-url", server_url, "--result-json", str(result_json), "--no-progress", *flags])
    return status, json.loads(result_json.read_text())


def test_single_run_counts_and_fields(tiny_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "cdf.png"
    flags = [
        "--num-prompts",
        "8",
        "--max-concurrency",
        "4",
        "--input-len",
        "32",
        "--output-len",
        "8",
        "--ignore-eos",
        "--label",
        "live",
        "--plot",
        str(plot),
    ]
    status, run = run_bench(tiny_server.base_url, tmp_path, *flags)
    assert status == 0
    assert CONFIG_FIELDS | METRIC_FIELDS <= run.keys()
    assert (run["model"], run["endpoint"], run["prompt_format"], run["label"]) == ("tiny", "completions", "token_ids", "live")
    assert (run["num_prompts"], run["max_concurrency"], run["request_rate"]) == (8, 4, "inf")
    assert (run["completed"], run["failed"], run["errors"]) == (8, 0, [])
    assert run["total_output_tokens"] == 8 * 8 and run["output_lens"] == [8] * 8
    assert run["total_input_tokens"] == 8 * 32 and run["input_lens"] == [32] * 8
    assert 0 < run["median_ttft_ms"] <= run["median_e2el_ms"] and run["mean_tpot_ms"] > 0 and run["p99_itl_ms"] > 0
    assert run["output_throughput"] == pytest.approx(64 / run["duration"])
    assert plot.read_bytes().startswith(PNG_MAGIC)
    table = capsys.readouterr().out
    assert "Successful requests:" in table and "Output token throughput (tok/s):" in table


def test_sweep_writes_a_list_and_a_plot(tiny_server: ServerProcess, tmp_path: Path) -> None:
    plot = tmp_path / "sweep.png"
    flags = [
        "--num-prompts",
        "4",
        "--concurrency-sweep",
        "1,2",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--ignore-eos",
        "--plot",
        str(plot),
    ]
    status, runs = run_bench(tiny_server.base_url + "/v1", tmp_path, *flags)
    assert status == 0
    assert [run["max_concurrency"] for run in runs] == [1, 2]
    assert all(run["completed"] == 4 and run["total_output_tokens"] == 16 for run in runs)
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_embeddings_endpoint_times_each_vector(embedding_server: ServerProcess, tmp_path: Path) -> None:
    flags = ["--endpoint", "embeddings", "--num-prompts", "12", "--max-concurrency", "6", "--input-len", "24"]
    status, run = run_bench(embedding_server.base_url, tmp_path, *flags)
    assert status == 0 and (run["endpoint"], run["model"], run["prompt_format"]) == ("embeddings", "minilm", "text")
    assert (run["completed"], run["failed"], run["total_output_tokens"]) == (12, 0, 0)
    assert run["total_input_tokens"] >= 12 * 12  # the server's own count, [CLS] and [SEP] included
    assert run["total_token_throughput"] > 0 and 0 < run["median_ttft_ms"] == run["median_e2el_ms"]


def test_chat_endpoint(tiny_server: ServerProcess, tmp_path: Path) -> None:
    flags = ["--endpoint", "chat", "--num-prompts", "4", "--max-concurrency", "2", "--input-len", "32", "--output-len", "8", "--ignore-eos"]
    status, run = run_bench(tiny_server.base_url, tmp_path, *flags)
    assert status == 0
    assert (run["endpoint"], run["prompt_format"]) == ("chat", "text")
    assert (run["completed"], run["total_output_tokens"]) == (4, 32)
    assert all(n > 0 for n in run["input_lens"])  # from the usage chunk (chat template included)


def test_bad_model_is_counted_not_raised(tiny_server: ServerProcess, tmp_path: Path) -> None:
    status, run = run_bench(tiny_server.base_url, tmp_path, "--model", "no-such-model", "--num-prompts", "3", "--output-len", "2")
    assert status == 1
    assert (run["completed"], run["failed"]) == (0, 3)
    assert all(error.startswith("HTTP 404") for error in run["errors"]) and len(run["errors"]) == 3


def test_closed_port_exits_1_without_traceback(tmp_path: Path) -> None:
    result_json = tmp_path / "down.json"
    command = [
        sys.executable,
        "-c",
        "from server.cli import main; main()",
        "bench",
        "--base-url",
        f"http://127.0.0.1:{free_port()}",
        "--num-prompts",
        "5",
        "--result-json",
        str(result_json),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 1
    assert "Traceback" not in finished.stderr + finished.stdout
    assert "Failed requests:" in finished.stdout
    run = json.loads(result_json.read_text())
    assert (run["completed"], run["failed"]) == (0, 5)
    assert run["errors"] and all("ConnectError" in error for error in run["errors"])


def test_extra_body_constrains_half_the_requests(tiny_server: ServerProcess, tmp_path: Path) -> None:
    """Half the requests are a one-token guided choice, so they stop after one token."""
    extra = json.dumps({"guided_choice": ["yes"], "ignore_eos": False})
    flags = [
        "--num-prompts",
        "6",
        "--max-concurrency",
        "3",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--ignore-eos",
        "--extra-body",
        extra,
        "--extra-body-fraction",
        "0.5",
    ]
    status, run = run_bench(tiny_server.base_url, tmp_path, *flags)
    assert status == 0 and run["completed"] == 6
    assert run["extra_body"] == json.loads(extra) and run["extra_body_fraction"] == 0.5
    assert sorted(run["output_lens"]) == [1, 1, 1, 8, 8, 8]
