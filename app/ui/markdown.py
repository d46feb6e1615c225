"""Markdown to the HTML subset Qt's rich text shows, with Pygments-highlighted code blocks."""

from __future__ import annotations

import html
import re
from functools import cache

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_by_name, guess_lexer
from pygments.util import ClassNotFound

TABLE = (
    '<table border="1" cellspacing="0" cellpadding="5" '
    'style="border-collapse: collapse; border-color: #8a8f96; margin-top: 6px; '
    'margin-bottom: 6px;">'
)
# A fenced code block as CommonMark has it: three or more backticks at the start of a line (any
# indent: a list item's block is indented), a language and no backtick after them on that line,
# and the block closed by a line of at least as many backticks alone. Backticks inside a line
# ("type ``` to start a block", a string in the code) neither open nor close one: such a line
# turned the rest of an answer into code.
FENCE = re.compile(r"^([ \t]*)(`{3,})([\w+-]*)[^\n`]*\n(.*?)(?:^[ \t]*\2`*[ \t]*$|\Z)", re.S | re.M)


def _block(m: re.Match) -> tuple[str, str]:
    """(language, code) of a FENCE match; the fence's own indent taken off each code line (a
    block in a list item is copied as the code, not as the list's indent)."""
    indent, code = m.group(1), m.group(4).rstrip("\n")
    if indent:
        code = "\n".join(line.removeprefix(indent) for line in code.split("\n"))
    return m.group(3), code


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a message (an unclosed last block counts, while streaming)."""
    return [_block(m)[1] for m in FENCE.finditer(text)]


TAG = re.compile(r"<[^>]*>")
HANG = 2  # a wrapped code line goes on this many columns right of the line's own indent
MOST_HANG = 24  # columns: a deeply indented line still leaves room for what wraps


def _code_html(lang: str, code: str, dark: bool, space_px: float) -> str:
    try:
        lexer = get_lexer_by_name(lang) if lang else guess_lexer(code)
    except ClassNotFound:
        lexer = TextLexer()
    bg = "#272822" if dark else "#f4f4f4"
    body = highlight(code, lexer, _formatter(dark))
    lines = body.rstrip("\n").split("\n")  # Pygments closes its spans at each line's end
    return (
        f'<table width="100%" cellpadding="8" style="background:{bg};"><tr><td>'
        + "".join(_code_line(line, space_px) for line in lines)
        + "</td></tr></table>"
    )


def _code_line(line: str, space_px: float) -> str:
    """One code line as a block of its own, which wraps where it is wider than the message (it
    was cut off at the message's edge) and goes on under its own indent plus HANG columns (it
    went on at column 0, under the code around it). ``space_px``: a space's width in the code's
    font (0: no hanging indent)."""
    text = html.unescape(TAG.sub("", line)).expandtabs(4)
    indent = len(text) - len(text.lstrip(" "))
    hang = min(indent + HANG, MOST_HANG) * space_px
    return (
        f'<pre style="margin:0; margin-left:{hang:.1f}px; text-indent:-{hang:.1f}px; '
        f'white-space:pre-wrap;">{line or " "}</pre>'  # an empty block would vanish
    )


# Built once: building a formatter or a converter took more time than using it (a chat of 200
# answers with code opened in 1.3 s, 0.45 s of it spent building them).
@cache
def _formatter(dark: bool) -> HtmlFormatter:
    return HtmlFormatter(style="monokai" if dark else "friendly", noclasses=True, nowrap=True)


@cache
def _converter() -> MarkdownIt:
    """CommonMark (markdown-it-py) with tables and strikethrough, as chat apps show answers: a
    single newline is a line break (Markdown's soft breaks ran a poem's lines, an address or
    code written without a fence into one line), a list may follow its introducing line
    without a blank line between ("Steps:\n1. ..."), and a bare http(s) address is a link
    (not a word that merely looks like a domain: "main.py", "example.com"). No raw HTML: a
    model's "<div>" or "<b>" is shown as written, and no tag of the model's reaches Qt's rich
    text."""
    options = {"breaks": True, "html": False, "linkify": True}
    converter = MarkdownIt("commonmark", options).enable(["table", "strikethrough", "linkify"])
    converter.linkify.set({"fuzzy_link": False, "fuzzy_email": False})
    return converter


def _markdown(text: str) -> str:
    # Each call starts from an empty environment: one answer's reference links never carry into
    # the next. Qt draws a bare <table> without rules or cell padding: cells ran into each other.
    return _converter().render(text).rstrip("\n").replace("<table>", TABLE)


def to_html(text: str, dark: bool = False, space_px: float = 0.0) -> str:
    """HTML for one message; code blocks are cut out first so markdown never touches them.
    ``space_px``: a space's width in code blocks (chat_view.code_space_px), for the hanging
    indent of their wrapped lines."""
    parts, last = [], 0
    for m in FENCE.finditer(text):
        parts.append(_markdown(text[last : m.start()]))
        parts.append(_code_html(*_block(m), dark, space_px))
        last = m.end()
    parts.append(_markdown(text[last:]))
    return "".join(parts)


def plain_html(text: str) -> str:
    """User messages are shown as typed."""
    return f'<p style="white-space:pre-wrap;">{html.escape(text)}</p>'
