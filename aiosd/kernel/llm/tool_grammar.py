"""Tool calls on the embedded model: a grammar that admits only well-formed calls.

The embedded model has no native tool calling.  Its output is constrained instead (llama.cpp
grammar, GBNF) to one JSON object that is either a call of an offered tool, with arguments
valid against that tool's JSON schema, or a final answer::

    {"tool": "fs.read", "arguments": {"path": "~/notes.txt"}}
    {"answer": "You have three notes."}

so even a 135M model always emits a call the daemon can run.  llama.cpp's own converter from
JSON schema is not used for the arguments: it lets an integer be any number of digits
(``minimum`` and ``maximum`` are not enforced) and takes a ``pattern`` such as ``[^\\x00]+``
literally, which would let a string hold an unescaped quote.  This one covers the subset tool
schemas use (objects, strings with length bounds and enums, integers with exact ranges,
numbers, booleans, null, arrays, ``anyOf``/``oneOf``, ``$ref`` to ``$defs``) and refuses the
rest (:class:`Unsupported`); what it cannot express exactly it narrows (a string is at most
:data:`MAX_STRING` characters, an array at most :data:`MAX_ITEMS` items, a ``pattern`` is
left to the daemon's check after generation), never widens.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: Characters of a string argument at most, in the grammar (the schema may allow more).
MAX_STRING = 512
#: Items of an array argument at most, in the grammar.
MAX_ITEMS = 16
#: The largest integer the grammar writes when a schema gives no maximum.
MAX_INT = 10**9 - 1

# A JSON string's characters: no quote, backslash or control character unescaped; the escapes
# that JSON has, but not \u (so no NUL, no lone surrogate).
_BASE = r"""
ws ::= " "?
char ::= [^"\\\x00-\x1f] | "\\" ["\\/bfnrt]
answer-text ::= "\"" char* "\""
"""


class Unsupported(Exception):
    """A schema this grammar cannot express."""


def _lit(value: Any) -> str:
    """A GBNF literal of the JSON text of ``value``."""
    text = json.dumps(value, ensure_ascii=False)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _digits(a: str, b: str) -> list[str]:
    """Alternatives matching every decimal of ``a``..``b`` (same length, ``a`` <= ``b``)."""
    n = len(a)
    if a == b:
        return [f'"{a}"']
    if a[1:] == "0" * (n - 1) and b[1:] == "9" * (n - 1):
        return [f"[{a[0]}-{b[0]}]" + " [0-9]" * (n - 1)]
    if a[0] == b[0]:
        return [f'"{a[0]}" ' + x for x in _digits(a[1:], b[1:])]
    out = [f'"{a[0]}" ' + x for x in _digits(a[1:], "9" * (n - 1))]
    lo, hi = int(a[0]) + 1, int(b[0]) - 1
    if lo <= hi:
        out.append(f"[{lo}-{hi}]" + " [0-9]" * (n - 1))
    out += [f'"{b[0]}" ' + x for x in _digits("0" * (n - 1), b[1:])]
    return out


def int_range(lo: int, hi: int) -> str:
    """A GBNF expression matching exactly the integers ``lo``..``hi`` as JSON writes them."""
    if lo > hi:
        raise Unsupported(f"an integer range {lo}..{hi} that holds no integer")
    alts: list[str] = []
    if lo < 0:
        neg_hi = -lo
        neg_lo = max(1, -hi)
        alts += [f'"-" ({x})' for x in _non_negative(neg_lo, neg_hi)]
    if hi >= 0:
        alts += _non_negative(max(0, lo), hi)
    return "(" + " | ".join(alts) + ")"


def _non_negative(lo: int, hi: int) -> list[str]:
    out: list[str] = []
    for length in range(len(str(lo)), len(str(hi)) + 1):
        a = lo if length == len(str(lo)) else 10 ** (length - 1)
        b = hi if length == len(str(hi)) else 10**length - 1
        out += _digits(str(a), str(b))
    return out


class _Builder:
    """GBNF rules for one grammar, named after where they are."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}

    def rule(self, name: str, body: str) -> str:
        base, i = name, 1
        while name in self.rules and self.rules[name] != body:
            i += 1
            name = f"{base}-{i}"
        self.rules[name] = body
        return name

    def value(self, schema: Any, name: str, root: dict[str, Any]) -> str:
        """A rule for a value of ``schema``; its name."""
        return self.rule(name, self._body(schema, name, root))

    def _body(self, s: Any, name: str, root: dict[str, Any]) -> str:
        if not isinstance(s, dict):
            raise Unsupported(f"schema {s!r}")
        if "$ref" in s:
            ref = str(s["$ref"])
            if not ref.startswith("#/$defs/"):
                raise Unsupported(f"$ref {ref!r}")
            target = root.get("$defs", {}).get(ref.removeprefix("#/$defs/"))
            if target is None:
                raise Unsupported(f"$ref {ref!r}: no such definition")
            return self.value(target, name + "-ref", root)
        if "const" in s:
            return _lit(s["const"])
        if "enum" in s:
            return " | ".join(_lit(v) for v in s["enum"])
        for key in ("anyOf", "oneOf"):
            if key in s:
                alts = [self.value(a, f"{name}-{i}", root) for i, a in enumerate(s[key])]
                return " | ".join(alts)
        kind = s.get("type")
        if isinstance(kind, list):
            return " | ".join(self.value({**s, "type": k}, f"{name}-{k}", root) for k in kind)
        if kind == "string":
            lo = int(s.get("minLength", 0))
            hi = min(int(s.get("maxLength", MAX_STRING)), MAX_STRING)
            if lo > hi:
                raise Unsupported(f"a string of at least {lo} characters")
            if "pattern" in s:
                return _pattern(str(s["pattern"]), lo, hi)
            return f'"\\"" char{{{lo},{hi}}} "\\""'
        if kind == "integer":
            lo = _bound(s, "minimum", "exclusiveMinimum", +1, -MAX_INT)
            hi = _bound(s, "maximum", "exclusiveMaximum", -1, MAX_INT)
            return int_range(max(lo, -MAX_INT), min(hi, MAX_INT))
        if kind == "number":
            if {"maximum", "exclusiveMaximum", "multipleOf"} & set(s):
                raise Unsupported("a number with an upper bound or a step")
            low = s.get("minimum", s.get("exclusiveMinimum"))
            if low is not None and low != 0:
                raise Unsupported(f"a number with the lower bound {low}")
            sign = "" if low is not None else '"-"? '
            return sign + '[0-9] [0-9]{0,8} ("." [0-9]{1,6})?'
        if kind == "boolean":
            return '"true" | "false"'
        if kind == "null":
            return '"null"'
        if kind == "array":
            item = self.value(s.get("items", {"type": "string"}), name + "-item", root)
            lo = int(s.get("minItems", 0))
            hi = min(int(s.get("maxItems", MAX_ITEMS)), MAX_ITEMS)
            if lo > hi:
                raise Unsupported(f"an array of at least {lo} items")
            if hi == 0:
                return '"[" ws "]"'
            more = f'("," ws {item}){{{max(lo - 1, 0)},{hi - 1}}}'
            inner = f"{item} ws {more} ws"
            return f'"[" ws {inner} "]"' if lo else f'"[" ws ({inner})? "]"'
        if kind == "object" or "properties" in s:
            return self._object(s, name, root)
        raise Unsupported(f"schema of type {kind!r}")

    def _object(self, s: dict[str, Any], name: str, root: dict[str, Any]) -> str:
        props: dict[str, Any] = s.get("properties", {})
        required = [k for k in props if k in set(s.get("required", []))]
        if set(s.get("required", [])) - set(props):
            raise Unsupported("an object that requires a member it does not describe")
        optional = [k for k in props if k not in required]
        kv = {
            k: self.rule(
                f"{name}-{_rule_name(k)}-kv",
                f'{_lit(k)} ws ":" ws {self.value(props[k], f"{name}-{_rule_name(k)}", root)}',
            )
            for k in props
        }
        # The optional members, in order, each present or not: rest-i is what may follow
        # the i-th one.
        rest: dict[int, str] = {}
        for i in range(len(optional) - 1, -1, -1):
            alts = [f'"," ws {kv[optional[j]]} {rest[j]}' for j in range(i + 1, len(optional))]
            body = f"({' | '.join(alts)})?" if alts else '""'
            rest[i] = self.rule(f"{name}-rest-{i}", body)
        if required:
            body = ' "," ws '.join(kv[k] for k in required)
            tail = [f'"," ws {kv[optional[j]]} {rest[j]}' for j in range(len(optional))]
            if tail:
                body += f" ({' | '.join(tail)})?"
            return f'"{{" ws {body} ws "}}"'
        if not optional:
            return '"{" ws "}"'
        first = " | ".join(f"{kv[optional[j]]} {rest[j]}" for j in range(len(optional)))
        return f'"{{" ws ({first})? ws "}}"'


#: A pattern's items: a class of safe characters, or one letter, digit, '_', '.' or '-'.
_ITEM = re.compile(r"\[((?:[A-Za-z0-9_.]|\\-|[A-Za-z0-9]-[A-Za-z0-9])+)\]|([A-Za-z0-9_.]|\\-)")
#: What "any character but NUL" is written as, which is the grammar's ``char``.
_NOT_NUL = ("[^\\x00]", "[^\x00]")


def _pattern(pattern: str, lo: int, hi: int) -> str:
    """A JSON string matching ``pattern`` with ``lo``..``hi`` characters, for patterns of
    the form ``^ITEM...ITEM[*+]?$``, where each item is a character class of letters,
    digits, ``_ . -`` and ranges of them (or one such character), or is ``[^\x00]``."""
    if not (pattern.startswith("^") and pattern.endswith("$")):
        raise Unsupported(f"pattern {pattern!r} (not anchored with ^ and $)")
    body = pattern[1:-1]
    for not_nul in _NOT_NUL:
        if body in (not_nul + "+", not_nul + "*"):
            least = max(lo, 1 if body.endswith("+") else 0)
            if least > hi:
                raise Unsupported(f"pattern {pattern!r} with at most {hi} characters")
            return f'"\\"" char{{{least},{hi}}} "\\""'
    items: list[tuple[str, str]] = []
    pos = 0
    while pos < len(body):
        m = _ITEM.match(body, pos)
        if m is None:
            raise Unsupported(f"pattern {pattern!r}")
        gbnf = f"[{m.group(1)}]" if m.group(1) is not None else f"[{m.group(2)}]"
        pos = m.end()
        quant = body[pos] if pos < len(body) and body[pos] in "*+" else ""
        pos += len(quant)
        items.append((gbnf, quant))
    if any(q for _, q in items[:-1]):
        raise Unsupported(f"pattern {pattern!r} (a repetition before its last item)")
    fixed = [g for g, q in items if not q]
    out = ['"\\""', *fixed]
    if items and items[-1][1]:
        least = max(lo - len(fixed), 1 if items[-1][1] == "+" else 0)
        most = hi - len(fixed)
        if least > most:
            raise Unsupported(f"pattern {pattern!r} with {lo}..{hi} characters")
        out.append(f"{items[-1][0]}{{{least},{most}}}")
    elif not lo <= len(fixed) <= hi:
        raise Unsupported(f"pattern {pattern!r} with {lo}..{hi} characters")
    out.append('"\\""')
    return " ".join(out)


def _bound(s: dict[str, Any], inclusive: str, exclusive: str, step: int, default: int) -> int:
    """The least (``step`` +1) or greatest (-1) integer the schema's bound admits."""
    if inclusive in s:
        v = float(s[inclusive])
        return math.ceil(v) if step > 0 else math.floor(v)
    if exclusive in s:
        v = float(s[exclusive])
        return math.floor(v) + 1 if step > 0 else math.ceil(v) - 1
    return default


def _rule_name(key: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in key).strip("-").lower() or "x"


def grammar(tools: list[dict[str, Any]], answer_only: bool = False) -> str:
    """The GBNF grammar of one reply: a call of one of ``tools`` (OpenAI-shaped specs), or
    an answer (only an answer with ``answer_only``).  Unsupported if a tool's schema cannot
    be expressed."""
    b = _Builder()
    alts = []
    for i, spec in enumerate([] if answer_only else tools):
        fn = spec["function"]
        schema = fn.get("parameters") or {"type": "object"}
        args = b.value(schema, f"args-{i}", schema)
        alts.append(
            b.rule(
                f"call-{i}",
                f'"{{" ws "\\"tool\\"" ws ":" ws {_lit(fn["name"])} ws "," ws '
                f'"\\"arguments\\"" ws ":" ws {args} ws "}}"',
            )
        )
    alts.append(b.rule("answer", '"{" ws "\\"answer\\"" ws ":" ws answer-text ws "}"'))
    rules = [f"root ::= {' | '.join(alts)}"] + [f"{k} ::= {v}" for k, v in b.rules.items()]
    return "\n".join(rules) + _BASE


def parse(text: str) -> tuple[str, dict[str, Any]] | str:
    """The model's reply: ``(tool, arguments)`` for a call, else the answer's text (the text
    itself when it is not one of the two shapes: a reply cut short)."""
    try:
        obj = json.loads(text)
    except ValueError:
        cut = _cut_answer(text)
        return cut if cut is not None else text
    if isinstance(obj, dict) and isinstance(obj.get("tool"), str):
        args = obj.get("arguments")
        return obj["tool"], args if isinstance(args, dict) else {}
    if isinstance(obj, dict) and isinstance(obj.get("answer"), str):
        return str(obj["answer"])
    return text


def _cut_answer(text: str) -> str | None:
    """The text of an answer cut short by the token limit (``{"answer": "Some wor``)."""
    m = _ANSWER_START.match(text)
    if m is None:
        return None
    rest = text[m.end() :]
    for end in range(len(rest), max(len(rest) - 8, -1), -1):  # a cut escape: drop it
        try:
            return str(json.loads('"' + rest[:end] + '"'))
        except ValueError:
            continue
    return rest


_ANSWER_START = re.compile(r'\{ ?"answer" ?: ?"')


def signature(spec: dict[str, Any]) -> str:
    """A tool as one line the model reads: ``fs.read(path: string, max_bytes?: integer)``."""
    fn = spec["function"]
    schema = fn.get("parameters") or {}
    props = schema.get("properties", {})
    required = set(schema.get("required", []))
    parts = []
    for k, v in props.items():
        kind = _kind_of(v, schema)
        parts.append(f"{k}{'' if k in required else '?'}: {kind}")
    desc = fn.get("description", "")
    return f"{fn['name']}({', '.join(parts)}) - {desc}".rstrip(" -")


def _kind_of(v: Any, root: dict[str, Any]) -> str:
    if not isinstance(v, dict):
        return "any"
    if "$ref" in v:
        target = root.get("$defs", {}).get(str(v["$ref"]).removeprefix("#/$defs/"), {})
        return _kind_of(target, root)
    if "enum" in v:
        return " | ".join(json.dumps(x) for x in v["enum"])
    if "const" in v:
        return json.dumps(v["const"])
    for key in ("anyOf", "oneOf"):
        if key in v:
            kinds = [_kind_of(a, root) for a in v[key] if a.get("type") != "null"]
            return " | ".join(kinds) or "null"
    return str(v.get("type", "any"))


INSTRUCTIONS = """You can use tools. Reply with one JSON object and nothing else:
to call a tool: {"tool": "<name>", "arguments": {<arguments>}}
to answer: {"answer": "<your answer>"}
Call a tool when you need facts you do not have; answer once the results are enough.
Tools:
"""


#: Said after each tool result: what the model should do with it.
AFTER_RESULT = "Use this result to answer my question."


def messages_for(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, str]]:
    """The conversation as a model without native tool calls reads it: the tools and the
    reply format in the system message, earlier calls and answers in the reply format, and
    each tool's result as a user turn."""
    listing = "\n".join(f"- {signature(t)}" for t in tools)
    system = INSTRUCTIONS + listing
    out: list[dict[str, str]] = []
    rest = messages
    if messages and messages[0].get("role") == "system":
        system = f"{messages[0].get('content', '')}\n\n{system}"
        rest = messages[1:]
    out.append({"role": "system", "content": system})
    for m in rest:
        role, content = m.get("role"), str(m.get("content") or "")
        if role == "assistant" and m.get("tool_calls"):
            for call in m["tool_calls"]:
                text = json.dumps({"tool": call["name"], "arguments": call.get("arguments", {})})
                out.append({"role": "assistant", "content": text})
        elif role == "assistant":
            out.append({"role": "assistant", "content": json.dumps({"answer": content})})
        elif role == "tool":
            out.append(
                {
                    "role": "user",
                    "content": f"Result of {m.get('tool_name', 'the tool')}: {content}\n"
                    + AFTER_RESULT,
                }
            )
        else:
            out.append({"role": str(role), "content": content})
    return out
