"""Configuration: defaults, drop-ins, unknown keys warn, bad values refuse to start."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from aiosd.config import ConfigError, LlamaCppModelConfig, OllamaModelConfig, load_config
from tests.support import REPO

SHIPPED = REPO / "etc" / "aiosd" / "aiosd.toml"


def test_shipped_file_equals_the_built_in_defaults() -> None:
    loaded = load_config(SHIPPED, required=True)
    assert loaded.warnings == []
    assert loaded.config == load_config(Path("/nonexistent/aiosd.toml")).config


def test_dropins_merge_over_the_main_file_in_order(tmp_path: Path) -> None:
    main = tmp_path / "aiosd.toml"
    main.write_text(SHIPPED.read_text())
    dropins = tmp_path / "aiosd.toml.d"
    dropins.mkdir()
    (dropins / "10-ollama.toml").write_text(
        '[llm.models.llama3]\nbackend = "ollama"\nmodel = "llama3.2"\n[scheduler]\nqueue_size = 5\n'
    )
    (dropins / "20-queue.toml").write_text("[scheduler]\nqueue_size = 7\n")
    (dropins / "ignored.conf").write_text("not toml at all [")
    cfg = load_config(main).config
    assert cfg.scheduler.queue_size == 7
    assert isinstance(cfg.llm.models["smollm2"], LlamaCppModelConfig)
    assert isinstance(cfg.llm.models["llama3"], OllamaModelConfig)
    assert cfg.llm.models["llama3"].host == "http://127.0.0.1:11434"


def test_unknown_keys_warn_naming_file_and_key(tmp_path: Path) -> None:
    main = tmp_path / "aiosd.toml"
    main.write_text(
        "[socket]\nmax_frame_byte = 10\n[colour]\nx = 1\n"
        '[llm.models.smollm2]\nbackend = "llamacpp"\nslot = 3\n'
    )
    loaded = load_config(main)
    assert f"{main}: unknown key 'socket.max_frame_byte' ignored" in loaded.warnings
    assert f"{main}: unknown key 'colour' ignored" in loaded.warnings
    assert f"{main}: unknown key 'llm.models.smollm2.slot' ignored" in loaded.warnings
    assert loaded.config.socket.max_frame_bytes == 1024 * 1024


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (
            "[socket]\nmax_frame_bytes = 10\n",
            "socket.max_frame_bytes",
            "greater than or equal to 1024",
        ),
        ('[daemon]\nlog_level = "loud"\n', "daemon.log_level", "'loud'"),
        ('[llm]\ndefault_model = "nope"\n', "llm", "'nope' is not one of the configured models"),
        ('[llm.models.x]\nbackend = "ollama"\nhost = "ftp://h"\n', "llm.models.x.host", "http://"),
        ('[llm.models.x]\nbackend = "gpt"\n', "llm.models.x", "'gpt'"),
        ("[scheduler]\nqueue_size = 'many'\n", "scheduler.queue_size", "valid integer"),
    ],
)
def test_invalid_values_name_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    main = tmp_path / "aiosd.toml"
    main.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(main)
    assert exc.value.file == str(main)
    assert exc.value.key == key
    assert reason in exc.value.reason


def test_error_points_at_the_dropin_that_set_the_value(tmp_path: Path) -> None:
    main = tmp_path / "aiosd.toml"
    main.write_text("[scheduler]\nqueue_size = 4\n")
    (tmp_path / "aiosd.toml.d").mkdir()
    bad = tmp_path / "aiosd.toml.d" / "50-bad.toml"
    bad.write_text("[scheduler]\nqueue_size = 0\n")
    with pytest.raises(ConfigError) as exc:
        load_config(main)
    assert exc.value.file == str(bad) and exc.value.key == "scheduler.queue_size"


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    main = tmp_path / "aiosd.toml"
    main.write_text("[socket\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(main)


def _aiosd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiosd", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_daemon_refuses_to_start_on_a_bad_value_with_exit_78(tmp_path: Path) -> None:
    main = tmp_path / "aiosd.toml"
    main.write_text("[socket]\nmax_connections = 0\n")
    out = _aiosd("--config", str(main))
    assert out.returncode == 78
    assert f"{main}: socket.max_connections:" in out.stderr
    assert "greater than or equal to 1" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    out = _aiosd("--config", str(tmp_path / "absent.toml"), "--check-config")
    assert out.returncode == 78
    assert "absent.toml: file does not exist" in out.stderr


def test_check_config_reports_warnings_and_files(tmp_path: Path) -> None:
    main = tmp_path / "aiosd.toml"
    main.write_text("[access]\nopen_to_everyone = true\n")
    out = _aiosd("--config", str(main), "--check-config")
    assert out.returncode == 0
    assert "unknown key 'access.open_to_everyone' ignored" in out.stderr
    assert str(main) in out.stdout


def test_every_model_key_is_a_toml_key_in_the_shipped_file() -> None:
    data = tomllib.loads(SHIPPED.read_text())
    assert set(data["llm"]["models"]["smollm2"]) == set(LlamaCppModelConfig.model_fields)
