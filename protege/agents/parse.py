"""Tool calls parsed out of an assistant turn: Qwen/Hermes tags, Llama-3.1 JSON, plain JSON.

    <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>      Qwen 2.5/3, Hermes
    {"name": "add", "parameters": {"a": 1}}                            Llama 3.1/3.2 (optionally after <|python_tag|>)
    {"name": "add", "arguments": {"a": 1}}                             plain JSON

Tolerant and bounded: no regular expression with nested quantifiers; JSON objects are found by
`json.JSONDecoder.raw_decode` from each "{" (at most MAX_STARTS starts, on at most MAX_CHARS
characters), so a hostile or degenerate turn costs linear-ish time, never a catastrophic backtrack.
A turn with no call gives `[]`; something that looks like a call but does not parse gives a
`ToolCall` with `error` set (a malformed call, sent back to the student as a tool error).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_CHARS = 65536  # an assistant turn longer than this is parsed on its first MAX_CHARS characters
MAX_STARTS = 64  # at most this many "{" positions are tried as the start of a JSON call
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_DECODER = json.JSONDecoder()


@dataclass
class ToolCall:
    """One parsed call: the tool's name and its arguments, or `error` saying why it could not be read."""

    name: str | None
    arguments: dict = field(default_factory=dict)
    error: str | None = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every tool call in `text` (an assistant turn's decoded text), in order of appearance."""
    text = text[:MAX_CHARS]
    if OPEN in text:
        return _tagged(text)
    return _bare_json(text.replace("<|python_tag|>", " "))


def _tagged(text: str) -> list[ToolCall]:
    """<tool_call>...</tool_call> blocks (a missing closing tag runs to the end of the turn)."""
    calls, pos = [], 0
    while len(calls) < MAX_STARTS:
        start = text.find(OPEN, pos)
        if start < 0:
            break
        end = text.find(CLOSE, start)
        body = text[start + len(OPEN): end if end >= 0 else len(text)].strip()
        calls.append(_from_json_text(body))
        if end < 0:
            break
        pos = end + len(CLOSE)
    return calls


def _from_json_text(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as e:
        return ToolCall(None, error=f"the tool call is not valid JSON ({getattr(e, 'msg', type(e).__name__)}): "
                                    f"{body[:200]!r}")
    return _call_of(obj)


def _bare_json(text: str) -> list[ToolCall]:
    """JSON objects with a "name" key anywhere in the turn (Llama-3.1 and plain JSON calls)."""
    calls, pos, starts = [], 0, 0
    while starts < MAX_STARTS:
        start = text.find("{", pos)
        if start < 0:
            break
        starts += 1
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError):
            pos = start + 1
            continue
        if isinstance(obj, dict) and "name" in obj:
            calls.append(_call_of(obj))
        pos = end
    if not calls and '"name"' in text:  # looks like a call, but no object parsed: a malformed call
        return [ToolCall(None, error=f"the tool call is not valid JSON: {text.strip()[:200]!r}")]
    return calls


def _call_of(obj) -> ToolCall:
    """A ToolCall from a decoded JSON value: {"name", "arguments" | "parameters"}; arguments may be a JSON string."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(None, error=f"a tool call must be a JSON object with a string \"name\", got {str(obj)[:200]!r}")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return ToolCall(obj["name"], error=f"the arguments of {obj['name']!r} are not valid JSON: {args[:200]!r}")
    if not isinstance(args, dict):
        return ToolCall(obj["name"], error=f"the arguments of {obj['name']!r} must be a JSON object, got "
                                           f"{type(args).__name__}")
    return ToolCall(obj["name"], args)
