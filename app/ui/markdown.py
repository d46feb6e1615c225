"""Markdown to the HTML subset Qt's rich text shows, with Pygments-highlighted code blocks."""

from __future__ import annotations

import html
import re
from functools import cache

from markdown_it import MarkdownIt
from markdown_it.common.utils import unescapeAll
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_by_name, guess_lexer
from pygments.util import ClassNotFound

TABLE = (
    '<table border="1" cellspacing="0" cellpadding="5" '
    'style="border-collapse: collapse; border-color: #8a8f96; margin-top: 6px; '
    'margin-bottom: 6px;">'
)


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a message, as CommonMark finds them: only a line that starts
    with three or more backticks opens one (backticks inside a line, "type ``` to start a block",
    do not), a block in a list item without the item's indent, and a block still streaming (not
    closed yet) counts."""
    return [t.content.rstrip("\n") for t in _converter().parse(text) if t.type == "fence"]


TAG = re.compile(r"<[^>]*>")
HANG = 2  # a wrapped code line goes on this many columns right of the line's own indent
MOST_HANG = 24  # columns: a deeply indented line still leaves room for what wraps


COPY_SCHEME = "copy-code"  # a code block's Copy link: copy-code:N, N its index in the message


def _code_html(lang: str, code: str, env: dict) -> str:
    """A code block: a head row with its language and a Copy link for this block alone (the
    message's Copy code gave every block at once), then the highlighted lines."""
    try:
        lexer = get_lexer_by_name(lang) if lang else guess_lexer(code)
    except ClassNotFound:
        lexer = TextLexer()
    dark, n = env["dark"], env["blocks"]
    env["blocks"] += 1
    bg, muted = ("#272822", "#a6a29a") if dark else ("#f4f4f4", "#6a6f76")
    body = highlight(code, lexer, _formatter(dark))
    lines = body.rstrip("\n").split("\n")  # Pygments closes its spans at each line's end
    copy = "Copied ✓" if env.get("copied") == n else f'<a href="{COPY_SCHEME}:{n}">Copy</a>'
    return (
        f'<table width="100%" cellpadding="8" cellspacing="0" style="background:{bg};">'
        f'<tr><td style="color:{muted}; padding-bottom:0;">{html.escape(lang)}</td>'
        f'<td align="right" style="padding-bottom:0;">{copy}</td></tr>'
        '<tr><td colspan="2">'
        + "".join(_code_line(line, env["space_px"]) for line in lines)
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
    converter.add_render_rule("fence", _fence)
    converter.add_render_rule("code_inline", _code_inline)
    return converter


def _fence(renderer, tokens, idx, options, env) -> str:
    """A fenced code block drawn where Markdown puts it: in a list item it sits under the item's
    text (code blocks were cut out before Markdown and drawn at the message's left edge, which
    also split the list in two)."""
    token = tokens[idx]
    lang = unescapeAll(token.info).strip().split(maxsplit=1)
    code = token.content.rstrip("\n")
    env["code"].append(code)
    return _code_html(lang[0] if lang else "", code, env)


INLINE_CODE_BG = ("#eceef1", "#3b3e43")  # light, dark: a shade off the message's own ground


def _code_inline(renderer, tokens, idx, options, env) -> str:
    """Inline code on a ground of its own: in the fixed-pitch font alone, "`pip install x`" in
    a sentence stood out from the words around it by little more than its letters' width."""
    bg = INLINE_CODE_BG[env["dark"]]
    return f'<code style="background-color:{bg};">{html.escape(tokens[idx].content)}</code>'


def render(
    text: str, dark: bool = False, space_px: float = 0.0, copied: int | None = None
) -> tuple[str, list[str]]:
    """(HTML, code_blocks' blocks) of one message from one parse, its code blocks highlighted by
    Pygments: a streamed answer is drawn again at each repaint, and its Copy code button follows
    its blocks. ``space_px``: a space's width in code blocks (chat_view.code_space_px), for the
    hanging indent of their wrapped lines; ``copied``: the block whose Copy link says "Copied ✓"
    for now. Each call starts from an empty environment: one answer's reference links never
    carry into the next. Qt draws a bare <table> without rules or cell padding: cells ran into
    each other."""
    env = {"dark": dark, "space_px": space_px, "blocks": 0, "copied": copied, "code": []}
    page = _converter().render(text, env).rstrip("\n").replace("<table>", TABLE)
    return page, env["code"]


def plain_html(text: str) -> str:
    """User messages are shown as typed."""
    return f'<p style="white-space:pre-wrap;">{html.escape(text)}</p>'
