"""``parse_settings``: command-line flags over ``TOKENSTEP_*`` environment
variables over ``Settings`` defaults."""

from dataclasses import fields
from typing import get_args

import pytest

from batching.engine_config import ACTIVATIONS, DTYPES, QUANTIZATIONS, EngineConfig
from server.cli import parse_settings
from server.engine_builder import engine_config
from server.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.upper().startswith("TOKENSTEP_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_flags_are_parsed():
    settings = parse_settings(["/some/model", "--port", "9000", "--no-enable-prefix-caching", "--kv-cache-memory", "256MiB"])
    assert settings.model == "/some/model"
    assert settings.port == 9000
    assert settings.enable_prefix_caching is False
    assert settings.kv_cache_memory == "256MiB"


def test_unset_flags_keep_the_defaults():
    settings = parse_settings([])
    defaults = Settings()
    assert settings == defaults
    assert settings.model is None
    assert settings.port == 8000
    assert settings.host == "0.0.0.0"
    assert settings.enable_prefix_caching is True
    assert settings.api_key is None


def test_every_contract_flag_is_accepted():
    settings = parse_settings(
        [
            "some/model",
            "--host", "127.0.0.1",
            "--port", "1234",
            "--api-key", "k",
            "--served-model-name", "served",
            "--max-num-seqs", "7",
            "--max-num-batched-tokens", "99",
            "--block-size", "32",
            "--kv-cache-memory", "1GiB",
            "--dtype", "bfloat16",
            "--device", "cpu",
            "--enable-prefix-caching",
        ]
    )  # fmt: skip
    assert (settings.host, settings.port, settings.api_key, settings.served_model_name) == ("127.0.0.1", 1234, "k", "served")
    assert (settings.max_num_seqs, settings.max_num_batched_tokens, settings.block_size) == (7, 99, 32)
    assert (settings.kv_cache_memory, settings.dtype, settings.device, settings.enable_prefix_caching) == ("1GiB", "bfloat16", "cpu", True)


def test_env_sets_a_value_when_no_flag(clean_env):
    clean_env.setenv("TOKENSTEP_MAX_NUM_SEQS", "3")
    assert parse_settings([]).max_num_seqs == 3
    assert parse_settings(["/some/model"]).max_num_seqs == 3


def test_flag_overrides_env(clean_env):
    clean_env.setenv("TOKENSTEP_MAX_NUM_SEQS", "3")
    assert parse_settings(["--max-num-seqs", "5"]).max_num_seqs == 5


@pytest.mark.parametrize(
    ("env", "value", "field", "expected"),
    [
        ("TOKENSTEP_PORT", "9100", "port", 9100),
        ("TOKENSTEP_API_KEY", "from-env", "api_key", "from-env"),
        ("TOKENSTEP_MODEL", "/env/model", "model", "/env/model"),
        ("TOKENSTEP_ENABLE_PREFIX_CACHING", "false", "enable_prefix_caching", False),
        ("TOKENSTEP_KV_CACHE_MEMORY", "128MiB", "kv_cache_memory", "128MiB"),
        ("TOKENSTEP_COMPILE", "true", "compile", True),
    ],
)
def test_env_for_other_flags(clean_env, env, value, field, expected):
    clean_env.setenv(env, value)
    assert getattr(parse_settings([]), field) == expected


def test_boolean_flag_overrides_env_both_ways(clean_env):
    clean_env.setenv("TOKENSTEP_ENABLE_PREFIX_CACHING", "false")
    assert parse_settings(["--enable-prefix-caching"]).enable_prefix_caching is True
    clean_env.setenv("TOKENSTEP_ENABLE_PREFIX_CACHING", "true")
    assert parse_settings(["--no-enable-prefix-caching"]).enable_prefix_caching is False


def test_compile_is_off_by_default_and_a_flag(clean_env):
    assert parse_settings([]).compile is False
    assert parse_settings(["--compile"]).compile is True
    clean_env.setenv("TOKENSTEP_COMPILE", "true")
    assert parse_settings(["--no-compile"]).compile is False


def test_quantization_and_activations_default_to_auto_and_take_each_choice(clean_env):
    assert parse_settings([]).quantization == "auto"
    assert parse_settings(["--quantization", "none"]).quantization == "none"
    assert parse_settings([]).activations == "auto"
    assert parse_settings(["--activations", "int16"]).activations == "int16"
    clean_env.setenv("TOKENSTEP_ACTIVATIONS", "int8")
    assert parse_settings([]).activations == "int8"
    with pytest.raises(SystemExit):
        parse_settings(["--activations", "int4"])


def test_positional_model_overrides_env(clean_env):
    clean_env.setenv("TOKENSTEP_MODEL", "/env/model")
    assert parse_settings(["/flag/model"]).model == "/flag/model"


def test_bad_flag_value_is_rejected():
    with pytest.raises(SystemExit):
        parse_settings(["--port", "not-a-number"])


def test_an_empty_model_means_the_default_and_speculation_is_a_setting(clean_env):
    clean_env.setenv("TOKENSTEP_MODEL", "")
    clean_env.setenv("TOKENSTEP_NUM_SPECULATIVE_TOKENS", "3")
    settings = parse_settings([])
    assert settings.model is None
    assert settings.num_speculative_tokens == 3
    assert parse_settings(["--num-speculative-tokens", "5"]).num_speculative_tokens == 5


def test_the_speculative_model_is_a_flag_and_an_empty_variable_means_none(clean_env):
    clean_env.setenv("TOKENSTEP_SPECULATIVE_MODEL", "")
    settings = parse_settings([])
    assert settings.speculative_model is None and settings.num_speculative_tokens is None
    assert parse_settings(["--speculative-model", "/models/draft"]).speculative_model == "/models/draft"


def test_each_engine_default_and_choice_list_is_stated_once():
    """Every ``EngineConfig`` field a user sets is a ``Settings`` field with
    the config's own default; the choices are the config module's lists."""
    set_only_by_code = {"num_kv_blocks", "gguf_file"}
    for field in fields(EngineConfig):
        if field.name not in set_only_by_code:
            assert Settings.model_fields[field.name].default == field.default, field.name
    for name, choices in {"dtype": DTYPES, "quantization": QUANTIZATIONS, "activations": ACTIVATIONS}.items():
        assert get_args(Settings.model_fields[name].annotation) == choices


def test_every_flag_reaches_the_engine_config_through_the_one_mapping(clean_env):
    flags = ["/m", "--dtype", "bfloat16", "--device", "cpu", "--quantization", "int8", "--activations", "int16"]
    flags += ["--block-size", "32", "--kv-cache-memory", "1GiB", "--max-num-seqs", "3", "--max-num-batched-tokens", "99"]
    flags += ["--no-enable-prefix-caching", "--max-model-len", "100", "--num-speculative-tokens", "2", "--speculative-model", "/d"]
    flags += ["--compile", "--cache-dir", "/c", "--no-kernels"]
    expected = EngineConfig(
        model="/m",
        dtype="bfloat16",
        device="cpu",
        quantization="int8",
        activations="int16",
        block_size=32,
        kv_cache_memory="1GiB",
        max_num_seqs=3,
        max_num_batched_tokens=99,
        enable_prefix_caching=False,
        max_model_len=100,
        num_speculative_tokens=2,
        speculative_model="/d",
        compile=True,
        cache_dir="/c",
        no_kernels=True,
    )
    assert engine_config(parse_settings(flags)) == expected
    assert engine_config(parse_settings([])) == EngineConfig()


def test_the_cache_folder_and_the_kernels_switch_are_settings_too(clean_env):
    clean_env.setenv("TOKENSTEP_CACHE_DIR", "/somewhere")
    clean_env.setenv("TOKENSTEP_NO_KERNELS", "1")
    config = engine_config(parse_settings([]))
    assert (config.cache_dir, config.no_kernels) == ("/somewhere", True)


def test_every_setting_has_a_flag_with_help(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--help"])
    help_text = capsys.readouterr().out
    for name, field in Settings.model_fields.items():
        assert name == "model" or f"--{name.replace('_', '-')}" in help_text
        assert field.description, f"{name} has no description for its --help"


def test_the_parser_flags_take_their_names_and_refuse_others(clean_env):
    assert parse_settings([]).tool_call_parser == "auto" and parse_settings([]).reasoning_parser == "auto"
    assert parse_settings(["--tool-call-parser", "qwen3_coder"]).tool_call_parser == "qwen3_coder"
    assert parse_settings(["--reasoning-parser", "qwen3"]).reasoning_parser == "qwen3"
    for flag in ("--tool-call-parser", "--reasoning-parser"):
        with pytest.raises(SystemExit):
            parse_settings([flag, "pythonic"])


def test_serve_runs_the_app_with_a_short_gil_switch_interval(monkeypatch: pytest.MonkeyPatch):
    """``tokenstep serve`` runs its app with the GIL switch interval that
    lets the model thread take the GIL back soon from the event loop's
    (``SWITCH_INTERVAL_S``, not Python's 5 ms), and still builds the app from
    the settings it parsed."""
    import sys

    import server.app
    import server.shutdown
    from server import cli

    seen = {}
    monkeypatch.setattr(server.app, "create_app", lambda settings, load: ("app", settings))
    monkeypatch.setattr(server.shutdown, "run_until_drained", lambda app, settings: seen.update(app=app, interval=sys.getswitchinterval()))
    before = sys.getswitchinterval()
    settings = cli.parse_settings(["--port", "8999"])
    try:
        cli.serve(settings)
    finally:
        sys.setswitchinterval(before)
    assert seen == {"app": ("app", settings), "interval": pytest.approx(cli.SWITCH_INTERVAL_S)}
    assert cli.SWITCH_INTERVAL_S < 0.005
