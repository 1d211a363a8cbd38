"""The grammar of tool calls on the embedded model (aiosd/kernel/llm/tool_grammar.py)."""

from __future__ import annotations

import random
import re

import pytest
from llama_cpp.llama_grammar import LlamaGrammar

from aiosd.kernel.llm import tool_grammar
from aiosd.kernel.llm.tool_grammar import Unsupported, int_range, parse
from aiosd.managers.builtin_tools import BUILTINS


def as_regex(expr: str) -> re.Pattern[str]:
    """A GBNF expression made of literals, classes, groups, ``|`` and ``{m,n}`` as a regex."""
    out = re.sub(r'"((?:[^"\\]|\\.)*)"', lambda m: re.escape(m.group(1).replace('\\"', '"')), expr)
    return re.compile(out.replace(" ", ""))


@pytest.mark.parametrize(
    "lo,hi",
    [(0, 0), (1, 10000), (2, 2**22), (-1, 3_600_000), (0, 10**9 - 1), (37, 4012),
     (-500, -3), (5, 5), (0, 9), (10, 99), (100, 100_000), (-20, 20)],
)  # fmt: skip
def test_an_integer_range_matches_exactly_its_integers(lo: int, hi: int) -> None:
    r = as_regex(int_range(lo, hi))
    rng = random.Random(lo * 31 + hi)
    near = set(range(lo - 60, lo + 600)) | set(range(hi - 600, hi + 60))
    for n in near | {rng.randint(lo - 10_000, hi + 10_000) for _ in range(5000)}:
        assert bool(r.fullmatch(str(n))) == (lo <= n <= hi), n
    for text in ("01", "-0", "+1", "1.0", ""):
        assert not r.fullmatch(text), text


def test_patterns_are_narrowed_to_safe_characters() -> None:
    name = tool_grammar._pattern(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", 1, 128)
    assert name == r'"\"" [A-Za-z0-9] [A-Za-z0-9_.\-]{0,127} "\""'
    assert tool_grammar._pattern(r"^[^\x00]+$", 1, 512) == r'"\"" char{1,512} "\""'
    for bad in (r"^a|b$", r"^[^a]+$", r'^["]+$', r"^(ab)+$", r"abc", r"^a*b$"):
        with pytest.raises(Unsupported):
            tool_grammar._pattern(bad, 0, 10)


def test_every_builtin_tool_has_a_grammar_llama_cpp_accepts() -> None:
    tools = [
        {"type": "function",
         "function": {"name": t.name, "description": t.description, "parameters": t.schema()}}
        for t in BUILTINS
    ]  # fmt: skip
    text = tool_grammar.grammar(tools)
    LlamaGrammar.from_string(text, verbose=False)
    # Each tool is one alternative of the root, and the answer the last.
    root = text.splitlines()[0]
    assert root == "root ::= " + " | ".join([f"call-{i}" for i in range(len(tools))] + ["answer"])


def test_schemas_it_cannot_express_are_refused() -> None:
    for schema in (
        {"type": "object", "properties": {"x": {"type": "number", "maximum": 3}}},
        {"type": "object", "properties": {"x": {"$ref": "https://example.org/s"}}},
        {"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a|b)$"}}},
        {"type": "object", "required": ["y"], "properties": {}},
    ):
        spec = {"type": "function", "function": {"name": "t", "parameters": schema}}
        with pytest.raises(Unsupported):
            tool_grammar.grammar([spec])


def test_replies_are_told_apart() -> None:
    assert parse('{"tool": "fs.read", "arguments": {"path": "x"}}') == ("fs.read", {"path": "x"})
    assert parse('{ "answer": "All done." }') == "All done."
    assert parse('{ "answer": "Cut sh') == "Cut sh"  # the token limit ended it
    assert parse('{ "answer": "Cut at \\') == "Cut at "
    assert parse("not json") == "not json"


def test_the_conversation_reads_as_the_reply_format() -> None:
    params = {"type": "object", "properties": {"path": {"type": "string"}}}
    tools = [
        {"type": "function",
         "function": {"name": "fs.list", "description": "List.", "parameters": params}}
    ]  # fmt: skip
    out = tool_grammar.messages_for(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is here?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"name": "fs.list", "arguments": {}}]},
            {"role": "tool", "tool_name": "fs.list", "content": '{"entries": []}'},
            {"role": "assistant", "content": "Nothing."},
        ],
        tools,
    )  # fmt: skip
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\nYou can use")
    assert "- fs.list(path?: string) - List." in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '{"tool": "fs.list", "arguments": {}}'}
    assert out[3] == {
        "role": "user",
        "content": 'Result of fs.list: {"entries": []}\n' + tool_grammar.AFTER_RESULT,
    }
    assert out[4] == {"role": "assistant", "content": '{"answer": "Nothing."}'}
