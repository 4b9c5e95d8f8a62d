"""One escaping layer per medium: text read from a recording or the wire, made inert where it is shown.

:func:`visible`, :func:`rich`, :func:`markdown` / :func:`markdown_code` and :func:`html`; every one
bounds the length.
"""

from __future__ import annotations

import html as _html
import re
import unicodedata

#: longest text shown for one name or value (the rest is replaced by an ellipsis)
MAX_CHARS = 200
ELLIPSIS = "…"
#: categories shown as escapes: control, format (bidi overrides, zero-width), separators of
#: lines/paragraphs, surrogates, private use and unassigned code points
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
#: what CommonMark/GFM read as syntax anywhere in a line (emphasis, code, links, images, HTML,
#: entities, tables, strikethrough, headings); each is written backslash-escaped
_MD_SPECIAL = frozenset("\\`*_{}[]()<>#+!|~&:$")
#: what Rich's markup parser reads as a tag: ``[`` then a tag-like body then ``]``
_RICH_TAG = re.compile(r"(\\*)(\[[a-zA-Z#/@!?:=*\]\[][^\[\]]*?\])")


def _escape_char(c: str) -> str:
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def _clip(text: str, max_chars: int | None) -> str:
    if max_chars is not None and len(text) > max_chars:
        return text[: max(0, max_chars - 1)] + ELLIPSIS
    return text


def visible(value: object, max_chars: int | None = MAX_CHARS) -> str:
    """``value`` as one line of plain text: every control/format character written as an escape."""
    text = _clip(str(value), None if max_chars is None else max_chars * 4)
    out = []
    for c in text:
        if unicodedata.category(c) in _HIDDEN_CATEGORIES:
            out.append(_escape_char(c))
        else:
            out.append(c)
    return _clip("".join(out), max_chars)


def rich(value: object, max_chars: int | None = MAX_CHARS) -> str:
    """For a Rich markup string: :func:`visible`, then every ``[tag]`` escaped (shown as typed)."""
    text = visible(value, max_chars)

    def _sub(m: re.Match[str]) -> str:
        backslashes, tag = m.group(1), m.group(2)
        return f"{backslashes}{backslashes}\\{tag}"

    text = _RICH_TAG.sub(_sub, text)
    if text.endswith("\\"):
        text += "\\"  # a trailing backslash would escape the markup that follows the field
    return text


def html(value: object, max_chars: int | None = MAX_CHARS) -> str:
    """For HTML text or a quoted attribute (also a Dash page title): :func:`visible`, then entities."""
    return _html.escape(visible(value, max_chars), quote=True)


def markdown(value: object, max_chars: int | None = MAX_CHARS) -> str:
    """For Markdown text (a table cell, a heading): no HTML, no emphasis, links, images or breaks."""
    text = visible(value, max_chars)
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in text)


def markdown_code(value: object, max_chars: int | None = MAX_CHARS) -> str:
    """A Markdown inline code span holding ``value`` literally (HTML inside a span is not HTML)."""
    text = visible(value, max_chars).replace("|", "¦")  # a pipe would split a table cell even in code
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"
