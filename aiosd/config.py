"""Configuration: pydantic models loaded from TOML, drop-ins, and command-line overrides.

The main file is ``/etc/aiosd/aiosd.toml`` (or ``--config PATH``); every ``*.toml`` file in
``<main file>.d/`` is merged over it in lexical order, table by table.  Unknown keys are
reported as warnings naming file and key; invalid values raise :class:`ConfigError` naming
file, key and reason, and the daemon refuses to start (exit code ``EXIT_CONFIG``).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from aiosd.paths import DEFAULT_RUNTIME_DIRECTORY, SOCKET_NAME

DEFAULT_CONFIG_PATH = Path("/etc/aiosd/aiosd.toml")
DEFAULT_STATE_DIRECTORY = Path("/var/lib/aiosd")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonConfig(_Section):
    """[daemon]: directories and logging."""

    state_directory: str = ""
    runtime_directory: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_target: Literal["auto", "journal", "stderr"] = "auto"


class SocketConfig(_Section):
    """[socket]: the Unix-socket JSON-RPC front-end."""

    enabled: bool = True
    path: str = ""
    mode: Annotated[int, Field(ge=0, le=0o777)] = 0o666
    max_frame_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    max_connections: Annotated[int, Field(ge=1, le=65536)] = 256
    max_connections_per_user: Annotated[int, Field(ge=1, le=65536)] = 32
    admin_reserved_connections: Annotated[int, Field(ge=0, le=65535)] = 16
    max_inflight_per_connection: Annotated[int, Field(ge=1, le=4096)] = 16
    max_inflight_per_user: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    stalled_timeout: Annotated[float, Field(gt=0, le=3600)] = 10.0

    @model_validator(mode="after")
    def _reserve_leaves_room(self) -> SocketConfig:
        if self.admin_reserved_connections >= self.max_connections:
            raise ValueError(
                f"admin_reserved_connections ({self.admin_reserved_connections}) must be "
                f"less than max_connections ({self.max_connections})"
            )
        return self


class DBusConfig(_Section):
    """[dbus]: the D-Bus front-end."""

    enabled: bool = True
    bus: str = "system"
    max_message_bytes: Annotated[int, Field(ge=64 * 1024, le=128 * 1024 * 1024)] = 32 * 1024 * 1024
    max_calls: Annotated[int, Field(ge=1, le=1_000_000)] = 1024
    max_calls_per_user: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    admin_reserved_calls: Annotated[int, Field(ge=0, le=999_999)] = 64

    @field_validator("bus")
    @classmethod
    def _bus_kind(cls, bus: str) -> str:
        if bus in ("system", "session") or (":" in bus and "=" in bus):
            return bus
        raise ValueError("must be 'system', 'session' or a D-Bus address such as unix:path=...")

    @model_validator(mode="after")
    def _calls_reserve_leaves_room(self) -> DBusConfig:
        if self.admin_reserved_calls >= self.max_calls:
            raise ValueError(
                f"admin_reserved_calls ({self.admin_reserved_calls}) must be less than "
                f"max_calls ({self.max_calls})"
            )
        return self


class AccessConfig(_Section):
    """[access]: who may use the daemon."""

    admin_group: str = "aios-admin"
    user_group: str = "aios"
    open_to_all: bool = False


class SchedulerConfig(_Section):
    """[scheduler]: the LLM request queues."""

    policy: Literal["priority"] = "priority"
    queue_size: Annotated[int, Field(ge=1, le=100000)] = 64
    max_queued_per_user: Annotated[int, Field(ge=1, le=100000)] = 16


class StorageConfig(_Section):
    """[storage]: long-term per-user storage."""

    durability: Literal["normal", "full"] = "normal"
    quota_bytes: Annotated[int, Field(ge=0, le=1 << 50)] = 256 * 1024 * 1024
    quota_entries: Annotated[int, Field(ge=0, le=1 << 40)] = 100_000
    retention: Annotated[int, Field(ge=1, le=10_000)] = 20
    max_value_bytes: Annotated[int, Field(ge=1, le=64 * 1024 * 1024)] = 1024 * 1024
    max_open_stores: Annotated[int, Field(ge=1, le=100_000)] = 64


class MemoryConfig(_Section):
    """[memory]: short-term memory of agents and client sessions."""

    lru_k: Annotated[int, Field(ge=1, le=16)] = 2
    budget_bytes: Annotated[int, Field(ge=1024, le=1 << 40)] = 64 * 1024 * 1024
    max_entries_per_space: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    max_bytes_per_space: Annotated[int, Field(ge=1024, le=1 << 40)] = 8 * 1024 * 1024
    max_entry_bytes: Annotated[int, Field(ge=1, le=64 * 1024 * 1024)] = 256 * 1024
    max_spaces_per_user: Annotated[int, Field(ge=1, le=1_000_000)] = 64
    max_bytes_per_user: Annotated[int, Field(ge=1024, le=1 << 40)] = 16 * 1024 * 1024
    max_pinned_bytes_per_user: Annotated[int, Field(ge=0, le=1 << 40)] = 2 * 1024 * 1024
    pinned_budget_bytes: Annotated[int, Field(ge=0, le=1 << 40)] = 16 * 1024 * 1024


class AgentsConfig(_Section):
    """[agents]: agents, the processes of users that the daemon starts and watches."""

    #: "auto": systemd transient units when systemd is PID 1, else subprocesses.
    backend: Literal["auto", "systemd", "subprocess"] = "auto"
    max_agents: Annotated[int, Field(ge=1, le=100_000)] = 256
    max_agents_per_user: Annotated[int, Field(ge=1, le=100_000)] = 16
    admin_reserved_agents: Annotated[int, Field(ge=0, le=99_999)] = 16
    #: Finished agents whose record and logs are kept, per user (the oldest go first).
    keep_finished_per_user: Annotated[int, Field(ge=0, le=100_000)] = 64
    #: Bytes of stdout/stderr kept per agent (its log and one older part of the same size).
    log_max_bytes: Annotated[int, Field(ge=4096, le=1 << 34)] = 256 * 1024
    #: Seconds between SIGTERM and SIGKILL in agent.stop (and when the daemon stops).
    stop_timeout: Annotated[float, Field(gt=0, le=3600)] = 10.0
    #: Limits of an agent that asks for none (0: none), and the most a user may ask for.
    memory_max: Annotated[int, Field(ge=0, le=1 << 50)] = 1024 * 1024 * 1024
    tasks_max: Annotated[int, Field(ge=0, le=1 << 22)] = 512
    runtime_max: Annotated[float, Field(ge=0, le=1 << 31)] = 0.0
    #: Seconds between two looks at each agent's memory, tasks and CPU (subprocess backend).
    watch_interval: Annotated[float, Field(gt=0, le=60)] = 0.2
    #: Installed agents (one directory with an agent.toml each) besides the users' own
    #: ~/.local/share/aiosd/agents.
    directories: list[str] = ["/usr/share/aiosd/agents", "/etc/aiosd/agents"]

    @model_validator(mode="after")
    def _reserve_leaves_room(self) -> AgentsConfig:
        if self.admin_reserved_agents >= self.max_agents:
            raise ValueError(
                f"admin_reserved_agents ({self.admin_reserved_agents}) must be less than "
                f"max_agents ({self.max_agents})"
            )
        return self


class McpServerConfig(_Section):
    """[tools.mcp.NAME]: an MCP server (stdio) whose tools everyone may use, each user
    running an instance of their own, as themselves."""

    #: The program and its arguments.
    command: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    #: Environment variables added to the user's clean environment.
    env: dict[str, str] = {}
    #: Believe the server's tool annotations (read-only, destructive, ...); otherwise every
    #: tool of it is taken as destructive and open-world.
    trusted: bool = False


#: Names of MCP servers (they prefix their tools') and the prefixes of the built-in tools.
MCP_SERVER_NAME = r"^[a-z0-9][a-z0-9_\-]{0,31}$"
RESERVED_TOOL_PREFIXES = ("fs", "proc", "system", "notify", "storage", "memory", "tool", "llm")


class ToolsConfig(_Section):
    """[tools]: the tool manager: built-in OS-bridge tools, user workers, consent."""

    #: Which calls wait for the user's yes: "destructive" (tools that change or delete
    #: something), "write" (every tool that is not read-only), or "none".
    confirm: Literal["destructive", "write", "none"] = "destructive"
    #: Tools that always ask, whatever the policy and the user's grants (names or globs).
    always_confirm: list[str] = []
    #: Tools nobody may use (names or globs): they are not listed and not called.
    deny: list[str] = []
    #: Seconds a confirmation request waits for an answer; no answer means no.
    confirm_timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    #: Confirmation requests waiting at once, per user.
    max_pending_per_user: Annotated[int, Field(ge=1, le=1000)] = 8
    #: Seconds a tool call may take (a call may ask for less).
    call_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    #: Bytes of a tool's result (as JSON) at most.
    max_output_bytes: Annotated[int, Field(ge=4096, le=64 << 20)] = 256 * 1024
    #: User workers (processes running a user's tool work as that user): per user, in all,
    #: and the last places kept for administrators.
    workers_per_user: Annotated[int, Field(ge=1, le=64)] = 2
    max_workers: Annotated[int, Field(ge=1, le=10_000)] = 64
    admin_reserved_workers: Annotated[int, Field(ge=0, le=9_999)] = 4
    #: Seconds an idle worker (or MCP server) is kept before it is stopped.
    worker_idle_timeout: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    #: Seconds an MCP server has to start and list its tools.
    mcp_start_timeout: Annotated[float, Field(gt=0, le=600)] = 30.0
    #: MCP servers running at once for one user.
    max_mcp_servers_per_user: Annotated[int, Field(ge=1, le=256)] = 8
    #: MCP servers for everyone: [tools.mcp.NAME] tables.
    mcp: dict[str, McpServerConfig] = {}

    @field_validator("mcp")
    @classmethod
    def _server_names(cls, servers: dict[str, McpServerConfig]) -> dict[str, McpServerConfig]:
        for name in servers:
            if not re.match(MCP_SERVER_NAME, name) or name in RESERVED_TOOL_PREFIXES:
                raise ValueError(
                    f"{name!r}: an MCP server's name is 1-32 of a-z 0-9 _ - (the first a letter "
                    f"or digit), and none of {', '.join(RESERVED_TOOL_PREFIXES)}"
                )
        return servers

    @model_validator(mode="after")
    def _reserve_leaves_room(self) -> ToolsConfig:
        if self.admin_reserved_workers >= self.max_workers:
            raise ValueError(
                f"admin_reserved_workers ({self.admin_reserved_workers}) must be less than "
                f"max_workers ({self.max_workers})"
            )
        return self


class ShutdownConfig(_Section):
    """[shutdown]: seconds allowed for each stop stage."""

    stop_accepting_timeout: Annotated[float, Field(gt=0, le=300)] = 2.0
    drain_timeout: Annotated[float, Field(ge=0, le=300)] = 10.0
    close_timeout: Annotated[float, Field(gt=0, le=300)] = 5.0


class LlamaCppModelConfig(_Section):
    """[llm.models.NAME] with backend = "llamacpp": a GGUF file run in-process."""

    backend: Literal["llamacpp"]
    path: str = ""
    n_ctx: Annotated[int, Field(ge=64, le=1 << 20)] = 2048
    slots: Annotated[int, Field(ge=1, le=64)] = 2
    threads: Annotated[int, Field(ge=0, le=1024)] = 0
    max_tokens: Annotated[int, Field(ge=1, le=1 << 20)] = 512


class OllamaModelConfig(_Section):
    """[llm.models.NAME] with backend = "ollama": a model served by an Ollama server."""

    backend: Literal["ollama"]
    host: str = "http://127.0.0.1:11434"
    model: str = ""
    slots: Annotated[int, Field(ge=1, le=64)] = 1
    timeout: Annotated[float, Field(gt=0, le=3600)] = 120.0
    max_tokens: Annotated[int, Field(ge=1, le=1 << 20)] = 512

    @field_validator("host")
    @classmethod
    def _host_scheme(cls, host: str) -> str:
        if not host.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return host


ModelConfig = Annotated[LlamaCppModelConfig | OllamaModelConfig, Field(discriminator="backend")]


def _default_models() -> dict[str, LlamaCppModelConfig | OllamaModelConfig]:
    return {"smollm2": LlamaCppModelConfig(backend="llamacpp")}


class LlmConfig(_Section):
    """[llm]: the named models and the default one."""

    default_model: str = "smollm2"
    models: dict[str, ModelConfig] = Field(default_factory=_default_models)

    @model_validator(mode="after")
    def _default_exists(self) -> LlmConfig:
        if not self.models:
            raise ValueError("at least one model must be configured under [llm.models.NAME]")
        if self.default_model not in self.models:
            raise ValueError(
                f"default_model {self.default_model!r} is not one of the configured models "
                f"({', '.join(sorted(self.models))})"
            )
        return self


class Config(_Section):
    """The whole configuration."""

    daemon: DaemonConfig = DaemonConfig()
    socket: SocketConfig = SocketConfig()
    dbus: DBusConfig = DBusConfig()
    access: AccessConfig = AccessConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    storage: StorageConfig = StorageConfig()
    memory: MemoryConfig = MemoryConfig()
    agents: AgentsConfig = AgentsConfig()
    tools: ToolsConfig = ToolsConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    llm: LlmConfig = LlmConfig()

    def state_dir(self) -> Path:
        """Configured state directory, else systemd's $STATE_DIRECTORY, else the default."""
        return _directory(self.daemon.state_directory, "STATE_DIRECTORY", DEFAULT_STATE_DIRECTORY)

    def runtime_dir(self) -> Path:
        """Configured runtime directory, else $RUNTIME_DIRECTORY, else /run/aiosd."""
        return _directory(
            self.daemon.runtime_directory, "RUNTIME_DIRECTORY", DEFAULT_RUNTIME_DIRECTORY
        )

    def socket_path(self) -> Path:
        """Where the JSON-RPC socket is bound when not socket-activated."""
        return Path(self.socket.path) if self.socket.path else self.runtime_dir() / SOCKET_NAME


def _directory(configured: str, env: str, default: Path) -> Path:
    if configured:
        return Path(configured)
    value = os.environ.get(env, "")
    if value:
        # systemd passes a colon-separated list when several directories are configured.
        return Path(value.split(":")[0])
    return default


class ConfigError(Exception):
    """A configuration file cannot be used; the message names file, key and reason."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


class LoadedConfig(BaseModel):
    """A validated config plus what loading it noticed."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    config: Config
    files: list[str]
    warnings: list[str]


def config_files(main: Path) -> list[Path]:
    """The main file (when it exists) followed by its drop-ins in lexical order."""
    files = [main] if main.exists() else []
    dropin_dir = Path(str(main) + ".d")
    if dropin_dir.is_dir():
        files.extend(sorted(p for p in dropin_dir.glob("*.toml") if p.is_file()))
    return files


def load_config(main: Path = DEFAULT_CONFIG_PATH, *, required: bool = False) -> LoadedConfig:
    """Load, merge and validate the configuration rooted at ``main``."""
    if required and not main.exists():
        raise ConfigError(str(main), "", "file does not exist")
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    files = config_files(main)
    for path in files:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), "", f"not valid TOML: {exc}") from exc
        _merge(merged, data, origin, str(path), "")
    warnings: list[str] = []
    cleaned = _strip_unknown(Config, merged, origin, "", warnings)
    try:
        config = Config.model_validate(cleaned)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
        file = _origin_of(origin, key) or (str(files[-1]) if files else "<defaults>")
        reason = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        if isinstance(value, (str, int, float, bool)) and first["type"] != "missing":
            reason = f"{reason} (got {value!r})"
        raise ConfigError(file, key, reason) from exc
    return LoadedConfig(config=config, files=[str(p) for p in files], warnings=warnings)


#: Each model config class by its ``backend`` tag, read off the ModelConfig union itself.
_MODEL_CLASSES: dict[str, type[BaseModel]] = {
    get_args(cls.model_fields["backend"].annotation)[0]: cls
    for cls in get_args(get_args(ModelConfig)[0])
}


def _is_union_tag(part: object) -> bool:
    return part in _MODEL_CLASSES


def _merge(
    into: dict[str, Any], data: dict[str, Any], origin: dict[str, str], file: str, prefix: str
) -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, origin, file, dotted + ".")
        else:
            into[key] = value
            _mark(value, origin, file, dotted)


def _mark(value: Any, origin: dict[str, str], file: str, dotted: str) -> None:
    origin[dotted] = file
    if isinstance(value, dict):
        for key, sub in value.items():
            _mark(sub, origin, file, f"{dotted}.{key}")


def _origin_of(origin: dict[str, str], key: str) -> str | None:
    while key:
        if key in origin:
            return origin[key]
        key = key.rpartition(".")[0]
    return None


def _strip_unknown(
    model: type[BaseModel],
    data: Any,
    origin: dict[str, str],
    prefix: str,
    warnings: list[str],
) -> Any:
    """Drop keys the model does not know, recording a warning naming each one."""
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            warnings.append(
                f"{_origin_of(origin, dotted) or '<config>'}: unknown key {dotted!r} ignored"
            )
            continue
        sub = _section_type(field.annotation)
        if sub is not None:
            out[key] = _strip_unknown(sub, value, origin, dotted + ".", warnings)
        elif model is LlmConfig and key == "models" and isinstance(value, dict):
            out[key] = {
                name: _strip_unknown(
                    _model_class(entry), entry, origin, f"{dotted}.{name}.", warnings
                )
                for name, entry in value.items()
            }
        else:
            out[key] = value
    return out


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, _Section):
        return annotation
    return None


def _model_class(entry: Any) -> type[BaseModel]:
    backend = entry.get("backend") if isinstance(entry, dict) else None
    return _MODEL_CLASSES.get(str(backend), LlamaCppModelConfig)
