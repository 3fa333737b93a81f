"""Tool calls in a model's reply: the answer text (after the think block, the end-of-turn token stripped) split into
content and the calls it makes, as the text streams. One parser per format; docs/tool-call-formats.md describes
each:

    leanseek       CONTENT<|tool_call|>NAME<|tool_args|>{json}<|tool_call|>...
    deepseek_v3    CONTENT<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{json}\\n```
                   <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>                                     (V3, R1)
    deepseek_v31   CONTENT<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{json}<｜tool▁call▁end｜>...
                   <｜tool▁calls▁end｜>                                                            (V3.1)
    deepseek_dsml  CONTENT\\n\\n<｜DSML｜function_calls> (V3.2) or <｜DSML｜tool_calls> (V4) around
                   <｜DSML｜invoke name="NAME"> blocks of <｜DSML｜parameter name=".." string="true|false"> values

A call is released once it is complete and well-formed, in one delta (its name and its whole arguments): a call cut
off or with arguments that are not a JSON object is given back as content text, the model's words as it wrote them,
and a streamed call can never need taking back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..data.tokenizer import TOOL_ARGS, TOOL_CALL


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON object text


@dataclass
class ToolCallDelta:
    index: int
    name: str | None = None  # on the first delta of a call
    arguments: str = ""


@dataclass(frozen=True)
class Format:
    """A tool-call format. Calls sit in a section (opened by one of `sections`' keys, closed by its value; none: a
    call opens at `call_begin` and runs to the next one or the end of the text); each call runs from `call_begin`
    to `call_end` (None: to the next call or the end of the text); `parse` reads a call's text (between the two)
    into (name, arguments JSON) or None when malformed. `lead` is the separator the template writes between the
    content and the section, not part of the content."""

    name: str
    call_begin: str
    parse: Callable[[str], tuple[str, str] | None]
    call_end: str | None = None
    sections: dict[str, str] = field(default_factory=dict)
    lead: str = ""


_NAME = re.compile(r"[^\s<>\"'`]+")


def _json_object(text: str) -> str | None:
    """The arguments as generated (stripped of surrounding whitespace), if they are a JSON object."""
    text = text.strip()
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None
    return text if isinstance(value, dict) else None


def _call(name: str, arguments: str) -> tuple[str, str] | None:
    name, arguments = name.strip(), _json_object(arguments)
    return (name, arguments) if _NAME.fullmatch(name) and arguments is not None else None


def _parse_leanseek(text: str) -> tuple[str, str] | None:
    name, sep, arguments = text.partition(TOOL_ARGS)
    return _call(name, arguments) if sep else None


_V3_CALL = re.compile(r"function<｜tool▁sep｜>([^\n]*)\n```json\n(.*)\n```\s*", re.DOTALL)


def _parse_v3(text: str) -> tuple[str, str] | None:
    m = _V3_CALL.fullmatch(text)
    return _call(m[1], m[2]) if m else None


def _parse_v31(text: str) -> tuple[str, str] | None:
    name, sep, arguments = text.partition("<｜tool▁sep｜>")
    return _call(name, arguments) if sep else None


_DSML_INVOKE = re.compile(r' name="([^"]*)">(.*)', re.DOTALL)
_DSML_PARAMETER = re.compile(r'\s*<｜DSML｜parameter name="([^"]*)" string="(true|false)">(.*?)</｜DSML｜parameter>',
                             re.DOTALL)


def _parse_dsml(text: str) -> tuple[str, str] | None:
    """An invoke's parameters as a JSON object: string="true" values are the string as written, the others JSON."""
    m = _DSML_INVOKE.fullmatch(text)
    if not m:
        return None
    body, arguments, at = m[2], {}, 0
    while (p := _DSML_PARAMETER.match(body, at)) is not None:
        key, is_string, value = p.groups()
        if key in arguments:
            return None
        if is_string == "true":
            arguments[key] = value
        else:
            try:
                arguments[key] = json.loads(value)
            except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
                return None
        at = p.end()
    if body[at:].strip():
        return None
    return _call(m[1], json.dumps(arguments, ensure_ascii=False))


FORMATS = {
    "leanseek": Format("leanseek", TOOL_CALL, _parse_leanseek),
    "deepseek_v3": Format("deepseek_v3", "<｜tool▁call▁begin｜>", _parse_v3, "<｜tool▁call▁end｜>",
                          {"<｜tool▁calls▁begin｜>": "<｜tool▁calls▁end｜>"}),
    "deepseek_v31": Format("deepseek_v31", "<｜tool▁call▁begin｜>", _parse_v31, "<｜tool▁call▁end｜>",
                           {"<｜tool▁calls▁begin｜>": "<｜tool▁calls▁end｜>"}),
    "deepseek_dsml": Format("deepseek_dsml", "<｜DSML｜invoke", _parse_dsml, "</｜DSML｜invoke>",
                            {"<｜DSML｜function_calls>": "</｜DSML｜function_calls>",
                             "<｜DSML｜tool_calls>": "</｜DSML｜tool_calls>"}, lead="\n\n"),
}


def _held(text: str, markers) -> int:
    """How many characters at the end of `text` may be the start of one of `markers`."""
    return max((k for m in markers for k in range(min(len(m) - 1, len(text)), 0, -1) if text.endswith(m[:k])),
               default=0)


class ToolCallParser:
    """One choice's answer text, fed as it streams: `feed` returns the content text it can release and the deltas of
    the calls completed; `finish`, at the end, releases the rest (a call left incomplete as content); `calls` holds
    the complete calls."""

    def __init__(self, fmt: Format):
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._end: str | None = None  # inside a section: the marker that closes it ("" when none does)
        self._raw = ""  # markup read in this section since its last call: content again if no call follows
        self._calls_here = False  # whether the current section has a call yet

    @property
    def _openers(self) -> list[str]:
        starts = list(self.fmt.sections) or [self.fmt.call_begin]
        return starts + [self.fmt.lead + s for s in starts] if self.fmt.lead else starts

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self._run(final=True)

    def _run(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = [], []
        while True:
            if self._end is None:
                if not self._outside(content, final):
                    break
            elif not self._inside(content, deltas, final):
                break
        return "".join(content), deltas

    def _outside(self, content: list[str], final: bool) -> bool:
        """Content up to the next section (or call, where there are no sections); False when more text is needed."""
        buf, fmt = self._buf, self.fmt
        found = [(i, s) for s in (fmt.sections or [fmt.call_begin]) if (i := buf.find(s)) >= 0]
        if not found:
            keep = 0 if final else _held(buf, self._openers)
            content.append(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        at, start = min(found)
        before = buf[:at]
        lead = fmt.lead if fmt.lead and before.endswith(fmt.lead) else ""
        content.append(before[: len(before) - len(lead)])
        if fmt.sections:
            self._end, self._raw, self._buf = fmt.sections[start], lead + start, buf[at + len(start):]
        else:
            self._end, self._raw, self._buf = "", lead, buf[at:]
        return True

    def _inside(self, content: list[str], deltas: list[ToolCallDelta], final: bool) -> bool:
        """The next call, or the section's end; False when more text is needed."""
        fmt, buf = self.fmt, self._buf
        body = buf.lstrip()
        space = buf[: len(buf) - len(body)]
        if self._end and body.startswith(self._end):
            if not self._calls_here:
                content.append(self._raw + space + self._end)  # an empty section is not a call
            self._leave(body[len(self._end):])
            return True
        if body.startswith(fmt.call_begin):
            rest = body[len(fmt.call_begin):]
            stop = rest.find(fmt.call_end or fmt.call_begin)
            if stop < 0:
                if not final:
                    return False  # the call is still arriving
                if fmt.call_end:  # cut off before its end
                    content.append(self._raw + buf)
                    self._leave("")
                    return False
                stop = len(rest)  # the last call runs to the end of the reply
            close = stop + len(fmt.call_end or "")
            call = fmt.parse(rest[:stop])
            if call is None:
                content.append(self._raw + space + fmt.call_begin + rest[:close])
            else:
                deltas.append(ToolCallDelta(len(self.calls), call[0], call[1]))
                self.calls.append(ToolCall(*call))
                self._calls_here = True
            self._raw, self._buf = "", rest[close:]
            if not self._buf and final:
                self._leave("")
                return False
            return True
        waiting = not final and any(m.startswith(body) for m in (self._end, fmt.call_begin) if m)
        if waiting or (final and not body and self._calls_here):
            if final:
                self._leave("")
            return False
        # anything else ends the section: the rest is read as content again
        content.append(self._raw)
        self._leave(buf)
        return True

    def _leave(self, rest: str) -> None:
        self._end, self._raw, self._buf = None, "", rest
        self._calls_here = False


def tool_parser(chat_format) -> Callable[[], ToolCallParser] | None:
    """A new parser for each choice, for the tool-call format the chat format's template writes; None if it writes
    none that leanseek knows."""
    name = format_name(chat_format.template)
    return None if name is None else (lambda: ToolCallParser(FORMATS[name]))


def format_name(template: str) -> str | None:
    """Which tool-call format a chat template writes, from the markup it spells."""
    if TOOL_CALL in template and TOOL_ARGS in template:
        return "leanseek"
    if "｜DSML｜" in template:
        return "deepseek_dsml"
    if "<｜tool▁calls▁begin｜>" in template:
        return "deepseek_v3" if "```json" in template else "deepseek_v31"
    return None
