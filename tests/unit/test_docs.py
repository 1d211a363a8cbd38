"""Keep the documentation and the code from drifting apart.

- docs/protocol.md describes every syscall of the table, every field of its parameter and result
  models (nested models included), every error class with its code, and its examples still
  validate against the models.
- The manual pages in docs/man/ carry every option of ``aiosd --help``, ``aiosctl --help`` and
  each ``aiosctl COMMAND --help``, and the exit statuses the code defines.
- docs/man/aiosd.toml.5 documents every configuration key with the default the code uses, and
  the shipped etc/aiosd/aiosd.toml shows every key the config models know.

The help texts come from running the real commands, so a new option fails here until it is
documented.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
import typing
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from aiosd import config as cfg
from aiosd import daemon
from aiosd.cli.main import EXIT_CODES, build_parser
from aiosd.errors import AiosError
from aiosd.kernel.llm.base import Backend, ChatChunk, ModelInfo
from aiosd.kernel.scheduler import Priority, Scheduler
from aiosd.kernel.syscalls import SYSCALLS

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = REPO / "docs" / "protocol.md"
MAN_AIOSD = REPO / "docs" / "man" / "aiosd.8"
MAN_AIOSCTL = REPO / "docs" / "man" / "aiosctl.1"
MAN_CONFIG = REPO / "docs" / "man" / "aiosd.toml.5"
SHIPPED_CONFIG = REPO / "etc" / "aiosd" / "aiosd.toml"

SD_ENVIRONMENT = (
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "WATCHDOG_USEC",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
)


# --- helpers -------------------------------------------------------------------------------


def roff_to_text(src: str) -> str:
    """The text of a roff source with font changes and the common escapes resolved."""
    text = re.sub(r"\\f(?:[BIRP1-4]|\(..|\[[^]]*\])", "", src)
    for escape, char in (
        ("\\-", "-"),
        ("\\(dq", '"'),
        ("\\(aq", "'"),
        ("\\(lq", "\u201c"),
        ("\\(rq", "\u201d"),
        ("\\(em", "\u2014"),
        ("\\&", ""),
        ("\\ ", " "),
        ("\\e", "\\"),
    ):
        text = text.replace(escape, char)
    return text


def man_sections(src: str, macro: str) -> dict[str, str]:
    """Body of each ``.SH``/``.SS`` section of a roff source, by its (unescaped) heading."""
    out: dict[str, str] = {}
    heading: str | None = None
    body: list[str] = []
    for line in src.splitlines():
        m = re.match(r"^\.(SH|SS)\s+(.*)$", line)
        if m:
            if heading is not None:
                out[heading] = "\n".join(body)
            if m.group(1) == macro:
                heading = roff_to_text(m.group(2)).strip()
                if heading.startswith('"') and heading.endswith('"'):
                    heading = heading[1:-1]
                body = []
            else:
                heading = None
            continue
        if heading is not None:
            body.append(line)
    if heading is not None:
        out[heading] = "\n".join(body)
    return out


def tp_tags(src: str) -> str:
    """The tag lines (the line after each ``.TP``) of a roff source, unescaped."""
    lines = src.splitlines()
    tags = [line for prev, line in zip(lines, lines[1:], strict=False) if prev == ".TP"]
    # Drop a leading font macro (.B, .BR, .BI ...) and the quotes around its arguments.
    tags = [re.sub(r"^\.(?:[BI]|[BIR][BIR])\s+", "", tag).replace('"', "") for tag in tags]
    return "\n".join(roff_to_text(tag) for tag in tags)


def models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """Every pydantic model class an annotation refers to (through unions, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from models_in(arg)


def fields_of(model: type[BaseModel]) -> Iterator[tuple[type[BaseModel], str]]:
    """(model, field name) for a model and every model nested in it."""
    seen: set[type[BaseModel]] = set()
    todo = [model]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name, field in current.model_fields.items():
            yield current, name
            todo.extend(models_in(field.annotation))


def error_classes() -> list[type[AiosError]]:
    """AiosError and every subclass of it."""
    out: list[type[AiosError]] = [AiosError]
    todo = list(AiosError.__subclasses__())
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def run_help(args: list[str]) -> str:
    """The --help output of a command run as a real process."""
    env = {k: v for k, v in os.environ.items() if k != "AIOSD_SOCKET"}
    env["COLUMNS"] = "200"
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def options_in_help(help_text: str) -> set[str]:
    """Every option string (``-h``, ``--config`` ...) a help text shows."""
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][A-Za-z0-9-]*)", help_text))


def choices_in_help(help_text: str) -> set[str]:
    """Every value of a ``{a,b,c}`` choice list a help text shows."""
    return {v for group in re.findall(r"\{([^}]+)\}", help_text) for v in group.split(",")}


def protocol_text() -> str:
    return PROTOCOL.read_text()


def protocol_section(name: str) -> str:
    """The part of docs/protocol.md under the heading ``### `name```."""
    text = protocol_text()
    m = re.search(rf"^### `{re.escape(name)}`\s*$", text, re.M)
    assert m, f"docs/protocol.md has no section '### `{name}`'"
    end = re.search(r"^#{2,3} ", text[m.end() :], re.M)
    return text[m.end() : m.end() + end.start()] if end else text[m.end() :]


def documented(field: str, text: str) -> bool:
    """Whether ``field`` appears in backticks, alone or as the last part of a dotted path."""
    return re.search(rf"`(?:[\w\[\]]+\.)*{re.escape(field)}`", text) is not None


def example_blocks() -> list[list[tuple[str, str]]]:
    """The (arrow, frame) lines of every fenced block of docs/protocol.md that has any."""
    blocks = []
    for body in re.findall(r"^```[^\n]*\n(.*?)^```", protocol_text(), re.M | re.S):
        lines = [(ln[0], ln[2:]) for ln in body.splitlines() if ln[:2] in ("→ ", "← ")]
        if lines:
            blocks.append(lines)
    return blocks


# --- docs/protocol.md ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_every_syscall_and_param_is_documented(name: str) -> None:
    section = protocol_section(name)
    missing = [
        f"{model.__name__}.{field}"
        for model, field in fields_of(SYSCALLS[name].params)
        if not documented(field, section)
    ]
    assert not missing, f"docs/protocol.md, section {name}: params not described: {missing}"


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_every_result_field_is_documented(name: str) -> None:
    section = protocol_section(name)
    missing = [
        f"{model.__name__}.{field}"
        for model, field in fields_of(SYSCALLS[name].result)
        if not documented(field, section)
    ]
    assert not missing, f"docs/protocol.md, section {name}: result fields not described: {missing}"


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_syscall_table_row(name: str) -> None:
    """The summary table names each syscall with its permission and its summary."""
    spec = SYSCALLS[name]
    rows = [ln for ln in protocol_text().splitlines() if ln.startswith(f"| `{name}` |")]
    assert rows, f"docs/protocol.md: no row for {name} in the syscall table"
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    permission = spec.permission.value if spec.permission is not None else "none"
    assert cells[1] == permission, f"{name}: table says {cells[1]!r}, code says {permission!r}"
    assert cells[2].startswith("with") if spec.streams else cells[2] == "no"
    assert cells[3] == spec.summary


def test_queue_entries_are_documented() -> None:
    """The keys of system.queue's running and waiting entries (built by the scheduler)."""

    async def entry_keys() -> tuple[set[str], set[str]]:
        s = Scheduler(queue_size=4)
        s.add_model("m", 1)
        entered, release = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with s.slot("m", 1000, 1, Priority.normal):
                entered.set()
                await release.wait()

        async def wait() -> None:
            async with s.slot("m", 1000, 2, Priority.batch):
                pass

        first = asyncio.create_task(hold())
        await entered.wait()
        second = asyncio.create_task(wait())
        await asyncio.sleep(0)
        view = s.view()["m"]
        release.set()
        await asyncio.gather(first, second)
        running, waiting = view["running"], view["waiting"]
        assert isinstance(running, list) and isinstance(waiting, list)
        return set(running[0]), set(waiting[0])

    running, waiting = asyncio.run(entry_keys())
    section = protocol_section("system.queue")
    missing = sorted(k for k in running | waiting if not documented(k, section))
    assert not missing, f"docs/protocol.md, system.queue: entry keys not described: {missing}"


class _FakeBackend(Backend):
    """A model that streams two pieces and a tool call, then finishes."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, "fake", self.slots, None)

    async def chat(self, request: Any, slot: int) -> AsyncGenerator[ChatChunk, None]:
        yield ChatChunk(content="Hello")
        yield ChatChunk(content="", tool_calls=[{"name": "f", "arguments": {}}])
        yield ChatChunk(done=True, finish_reason="stop", prompt_tokens=1, completion_tokens=2)


def test_stream_notification_members_are_documented() -> None:
    from aiosd.kernel.kernel import Kernel
    from aiosd.managers.access import Caller

    notes: list[dict[str, Any]] = []

    async def run() -> None:
        kernel = Kernel(cfg.Config(), backends={"smollm2": _FakeBackend("smollm2", 1)})
        await kernel.start()

        async def emit(note: dict[str, Any]) -> None:
            notes.append(note)

        params = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        await kernel.dispatch("llm.chat", params, Caller(uid=0, gid=0, pid=1), emit)

    asyncio.run(run())
    keys = {"id"} | {k for note in notes for k in note}  # the socket server adds "id"
    text = protocol_text()
    streaming = text[text.index("## Streaming") : text.index("## Cancellation")]
    missing = sorted(k for k in keys if not documented(k, streaming))
    assert not missing, f"docs/protocol.md, Streaming: members not described: {missing}"


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_every_error_is_documented(cls: type[AiosError]) -> None:
    rows = [
        ln
        for ln in protocol_text().splitlines()
        if ln.startswith(f"| `{cls.rpc_code}` |") and f"| `{cls.__name__}` |" in ln
    ]
    assert rows, f"docs/protocol.md: no error table row '| `{cls.rpc_code}` | `{cls.__name__}` |'"
    dbus_suffix = cls.dbus_name.rsplit(".", 1)[-1]
    assert f"`{dbus_suffix}`" in rows[0], f"{cls.__name__}: D-Bus name {cls.dbus_name} not in row"


#: The members of each streaming syscall's notifications (the socket server adds ``id``).
STREAM_MEMBERS = {
    "llm.chat": {"id", "seq", "content", "tool_calls", "step", "confirm"},
    "agent.logs": {"id", "seq", "content", "stream", "time", "dropped"},
    "tool.call": {"id", "confirm"},
}


def test_examples_validate_against_the_models() -> None:
    """Every example frame is JSON-RPC; requests and results validate against the table."""
    codes = {cls.rpc_code for cls in error_classes()}
    succeeded: set[str] = set()
    for block in example_blocks():
        requests: dict[Any, dict[str, Any]] = {}
        replies = [json.loads(frame) for arrow, frame in block if arrow == "←"]
        parse_error_shown = any(r.get("error", {}).get("code") == -32700 for r in replies)
        for arrow, frame in block:
            if arrow == "→":
                try:
                    msg = json.loads(frame)
                except ValueError:
                    assert parse_error_shown, f"request example is not JSON: {frame}"
                    continue
                if "id" in msg:
                    requests[msg["id"]] = msg
                continue
            reply = json.loads(frame)
            assert reply.get("jsonrpc") == "2.0", frame
            if reply.get("method") == "stream":
                streamed = requests[reply["params"]["id"]]["method"]
                assert set(reply["params"]) <= STREAM_MEMBERS[streamed], frame
            elif "error" in reply:
                assert reply["error"]["code"] in codes, frame
                assert set(reply["error"]) <= {"code", "message", "data"}, frame
            else:
                request = requests[reply["id"]]
                spec = SYSCALLS[request["method"]]
                spec.params.model_validate(request.get("params") or {})
                spec.result.model_validate(reply["result"])
                succeeded.add(request["method"])
    missing = sorted(set(SYSCALLS) - succeeded)
    assert not missing, f"docs/protocol.md has no successful example of: {missing}"


def test_config_references_name_real_keys() -> None:
    """``[section] key`` and ``section.key`` in the docs name keys the config models know."""
    sections = {name: f.annotation for name, f in cfg.Config.model_fields.items()}
    texts = {
        "docs/protocol.md": protocol_text(),
        **{
            f"docs/man/{p.name}": roff_to_text(p.read_text())
            for p in (MAN_AIOSD, MAN_AIOSCTL, MAN_CONFIG)
        },
    }
    bad = []
    for where, text in texts.items():
        refs = re.findall(r"\[([a-z_]+)\] ([a-z_]+)", text)
        # ("llm." is left out: llm.chat and llm.models are syscalls)
        refs += re.findall(r"(?<![\w.])(daemon|socket|access|scheduler|shutdown)\.([a-z_]+)", text)
        for section, key in refs:
            model = sections.get(section)
            if model is None or key not in model.model_fields:
                bad.append(f"{where}: {section} {key}")
    assert not bad, f"references to configuration keys that do not exist: {sorted(set(bad))}"


# --- manual pages: options and exit statuses ----------------------------------------------------


def test_aiosd_man_page_has_every_option() -> None:
    help_text = run_help(["-m", "aiosd", "--help"])
    tags = tp_tags(man_sections(MAN_AIOSD.read_text(), "SH")["OPTIONS"])
    missing = sorted(o for o in options_in_help(help_text) if not re.search(rf"{o}\b", tags))
    assert not missing, f"aiosd(8) OPTIONS has no entry for options of 'aiosd --help': {missing}"
    missing = sorted(c for c in choices_in_help(help_text) if c not in tags)
    assert not missing, f"aiosd(8) OPTIONS lacks choices of 'aiosd --help': {missing}"


def test_aiosd_man_page_exit_statuses_and_environment() -> None:
    src = MAN_AIOSD.read_text()
    sections = man_sections(src, "SH")
    statuses = set(re.findall(r"^\.B (\d+)$", sections["EXIT STATUS"], re.M))
    codes = {daemon.EXIT_OK, daemon.EXIT_FAILURE, daemon.EXIT_USAGE, daemon.EXIT_CONFIG}
    assert statuses == {str(c) for c in codes}
    environment = roff_to_text(sections["ENVIRONMENT"])
    missing = [v for v in SD_ENVIRONMENT if v not in environment]
    assert not missing, f"aiosd(8) ENVIRONMENT lacks {missing}"
    signals = roff_to_text(sections["SIGNALS"])
    assert "SIGTERM" in signals and "SIGHUP" in signals


def aiosctl_commands() -> list[str]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    raise AssertionError("aiosctl has no subcommands")


def test_aiosctl_man_page_has_every_option() -> None:
    src = MAN_AIOSCTL.read_text()
    tags = tp_tags(src)
    help_text = run_help(["-m", "aiosd.cli", "--help"])
    missing = sorted(o for o in options_in_help(help_text) if not re.search(rf"{o}\b", tags))
    assert not missing, f"aiosctl(1) has no entry for options of 'aiosctl --help': {missing}"
    missing = [name for name in SYSCALLS if not re.search(rf"^{re.escape(name)}$", tags, re.M)]
    assert not missing, f"aiosctl(1) does not describe the syscalls {missing}"


@pytest.mark.parametrize("command", aiosctl_commands())
def test_aiosctl_man_page_has_every_command_option(command: str) -> None:
    src = MAN_AIOSCTL.read_text()
    commands = roff_to_text(man_sections(src, "SH")["COMMANDS"])
    assert re.search(rf"^\.BI? {command}\b", man_sections(src, "SH")["COMMANDS"], re.M), (
        f"aiosctl(1) COMMANDS has no entry for {command}"
    )
    help_text = run_help(["-m", "aiosd.cli", command, "--help"])
    tags = tp_tags(src)
    missing = sorted(o for o in options_in_help(help_text) if not re.search(rf"{o}\b", tags))
    assert not missing, f"aiosctl(1) has no entry for 'aiosctl {command} --help' options {missing}"
    missing = sorted(c for c in choices_in_help(help_text) if c not in commands)
    assert not missing, f"aiosctl(1) COMMANDS lacks 'aiosctl {command} --help' choices {missing}"


def test_aiosctl_man_page_exit_statuses() -> None:
    src = MAN_AIOSCTL.read_text()
    sections = man_sections(src, "SH")
    statuses = set(re.findall(r"^\.B (\d+)$", sections["EXIT STATUS"], re.M))
    assert statuses == {str(code) for code in EXIT_CODES}
    assert "AIOSD_SOCKET" in roff_to_text(sections["ENVIRONMENT"])


@pytest.mark.parametrize("page", [MAN_AIOSD, MAN_AIOSCTL, MAN_CONFIG], ids=lambda p: p.name)
def test_man_page_renders_without_warnings(page: Path) -> None:
    proc = subprocess.run(
        ["groff", "-man", "-ww", "-z", "-Tutf8", str(page)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


# --- configuration: shipped file, models, aiosd.toml(5) ---------------------------------------


def config_sections() -> dict[str, type[BaseModel]]:
    """Each config model by the heading aiosd.toml(5) gives it."""
    out: dict[str, type[BaseModel]] = {}
    for name, field in cfg.Config.model_fields.items():
        (model,) = models_in(field.annotation)
        out[f"[{name}]"] = model
    for model in models_in(cfg.LlmConfig.model_fields["models"].annotation):
        (backend,) = typing.get_args(model.model_fields["backend"].annotation)
        out[f'[llm.models.NAME] with backend = "{backend}"'] = model
    return out


def model_section_of(table: dict[str, Any]) -> str:
    return f'[llm.models.NAME] with backend = "{table.get("backend", "llamacpp")}"'


def man_entries(section_src: str) -> dict[str, str]:
    """key -> documented default (TOML text) of the ``.TP`` entries of a section."""
    entries: dict[str, str] = {}
    lines = section_src.splitlines()
    for prev, line in zip(lines, lines[1:], strict=False):
        if prev.strip() != ".TP":
            continue
        m = re.match(r"^\\fB(\w+)\\fR = \\fI(.*?)\\fR \(.*\)$", line)
        assert m, f"aiosd.toml(5): not '\\fBkey\\fR = \\fIdefault\\fR (type)': {line}"
        entries[m.group(1)] = roff_to_text(m.group(2))
    return entries


def commented_tables(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The example tables of a TOML file that are commented out (``# [table]``, ``# key = v``)."""
    out = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^#\s*\[([\w.]+)\]\s*$", line)
        if not m:
            continue
        body = []
        for follow in lines[i + 1 :]:
            km = re.match(r"^#\s*([A-Za-z_]\w*\s*=.*)$", follow)
            if not follow.startswith("#") or re.match(r"^#\s*\[", follow):
                break
            if km:
                body.append(km.group(1))
        out.append((m.group(1), tomllib.loads("\n".join(body))))
    return out


def leaf_keys(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_every_shipped_key_is_in_the_man_page() -> None:
    shipped = tomllib.loads(SHIPPED_CONFIG.read_text())
    sections = man_sections(MAN_CONFIG.read_text(), "SS")
    missing = []
    for dotted, _ in leaf_keys(shipped):
        parts = dotted.split(".")
        if parts[:2] == ["llm", "models"]:
            heading = model_section_of(shipped["llm"]["models"][parts[2]])
        else:
            heading = f"[{'.'.join(parts[:-1])}]"
        if heading not in sections or parts[-1] not in man_entries(sections[heading]):
            missing.append(dotted)
    assert not missing, f"aiosd.toml(5) does not document shipped keys: {missing}"


@pytest.mark.parametrize("heading", sorted(config_sections()))
def test_man_page_documents_each_key_with_its_default(heading: str) -> None:
    model = config_sections()[heading]
    sections = man_sections(MAN_CONFIG.read_text(), "SS")
    assert heading in sections, f"aiosd.toml(5) has no section '.SS {heading}'"
    entries = man_entries(sections[heading])
    fields = {
        k: f
        for k, f in model.model_fields.items()
        if not (model is cfg.LlmConfig and k == "models")
    }
    assert set(entries) == set(fields), (
        f"aiosd.toml(5) {heading}: documented {sorted(entries)}, the code has {sorted(fields)}"
    )
    for key, field in fields.items():
        shown = tomllib.loads(f"v = {entries[key]}")["v"]
        if field.default is PydanticUndefined:  # required: the section's literal value
            (expected,) = typing.get_args(field.annotation)
        else:
            expected = field.get_default(call_default_factory=True)
        assert shown == expected and type(shown) is type(expected), (
            f"aiosd.toml(5) {heading} {key}: documented default {entries[key]}, code {expected!r}"
        )


def test_shipped_config_shows_every_key() -> None:
    """etc/aiosd/aiosd.toml names every key of every config model (models: possibly commented)."""
    text = SHIPPED_CONFIG.read_text()
    shipped = tomllib.loads(text)
    seen: dict[str, set[str]] = {}
    for name in config_sections():
        if name.startswith("[llm.models."):
            continue
        seen[name] = set(shipped.get(name.strip("[]"), {}))
    tables = list(shipped["llm"]["models"].values())
    tables += [t for dotted, t in commented_tables(text) if dotted.startswith("llm.models.")]
    for table in tables:
        seen.setdefault(model_section_of(table), set()).update(table)
    missing = []
    for heading, model in config_sections().items():
        for key in model.model_fields:
            if model is cfg.LlmConfig and key == "models":
                continue
            if key not in seen.get(heading, set()):
                missing.append(f"{heading} {key}")
    assert not missing, f"etc/aiosd/aiosd.toml does not show: {missing}"


def test_shipped_config_shows_the_defaults() -> None:
    """The shipped file says it shows every key with its default value: hold it to that."""
    shipped = tomllib.loads(SHIPPED_CONFIG.read_text())
    wrong = []
    for heading, model in config_sections().items():
        if heading.startswith("[llm.models."):
            continue
        for key, value in shipped.get(heading.strip("[]"), {}).items():
            if isinstance(value, dict):
                continue
            if value != model.model_fields[key].get_default(call_default_factory=True):
                wrong.append(f"{heading} {key} = {value!r}")
    for table in shipped["llm"]["models"].values():
        model = config_sections()[model_section_of(table)]
        for key, value in table.items():
            if key != "backend" and value != model.model_fields[key].default:
                wrong.append(f"{model_section_of(table)} {key} = {value!r}")
    assert not wrong, f"etc/aiosd/aiosd.toml shows values that are not the defaults: {wrong}"


def test_shipped_config_is_valid() -> None:
    loaded = cfg.load_config(SHIPPED_CONFIG, required=True)
    assert loaded.warnings == []


def test_config_man_page_names_exit_status_and_drop_ins() -> None:
    text = roff_to_text(MAN_CONFIG.read_text())
    assert re.search(rf"\b{daemon.EXIT_CONFIG}\b", text)
    assert "aiosd.toml.d" in text
