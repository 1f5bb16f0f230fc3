"""Password literals out of query texts (/insights).

pg_stat_statements replaces the constants of plannable statements by $1, $2..., but stores
utility statements verbatim: `ALTER ROLE app PASSWORD 'secret'`, `CREATE USER MAPPING ...
OPTIONS (password 'x')`, `CREATE SUBSCRIPTION ... CONNECTION '... password=x'`. The rule is
deliberately blunt: in a statement whose text mentions "password" anywhere (any case, even
inside a literal), every string literal is replaced by '[redacted]', whatever its form:
'...' (with '' inside), E'...' (backslash escapes), U&'...', B'', X'', N'', and dollar quotes
$$...$$ / $tag$...$tag$. A literal that never ends is redacted to the end of the text. Comments
and quoted identifiers are skipped as such, so a quote inside them does not derail the scan.
"""

from __future__ import annotations

import re

REDACTED = "'[redacted]'"

_MENTIONS_PASSWORD = re.compile(r"password", re.IGNORECASE)
# A dollar-quote opener: $$ or $tag$ (a tag never starts with a digit: $1 is a parameter).
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")
_IDENT_START = re.compile(r"[A-Za-z_\x80-\U0010ffff]")
_IDENT_REST = re.compile(r"[A-Za-z0-9_$\x80-\U0010ffff]*")
# Prefixes that turn a following quote into a string literal of another kind.
_STRING_PREFIXES = {"e", "b", "x", "n", "u&"}


def redact_passwords(query: str) -> str:
    """`query` with its string literals redacted when it mentions a password, else unchanged."""
    if not isinstance(query, str) or not _MENTIONS_PASSWORD.search(query):
        return query
    out: list[str] = []
    i, n = 0, len(query)
    while i < n:
        ch = query[i]
        if ch == "-" and query.startswith("--", i):  # line comment
            j = query.find("\n", i)
            j = n if j < 0 else j
            out.append(query[i:j])
            i = j
        elif ch == "/" and query.startswith("/*", i):  # block comment (they nest)
            j = _block_comment_end(query, i)
            out.append(query[i:j])
            i = j
        elif ch == '"':  # quoted identifier, "" inside
            j = _quoted_end(query, i + 1, '"', backslash=False)
            out.append(query[i:j])
            i = j
        elif ch == "'":
            i = _quoted_end(query, i + 1, "'", backslash=False)
            out.append(REDACTED)
        elif ch == "$" and (m := _DOLLAR_TAG.match(query, i)) and not _in_identifier(query, i):
            tag = m.group(0)
            j = query.find(tag, m.end())
            i = n if j < 0 else j + len(tag)
            out.append(REDACTED)
        elif _IDENT_START.match(ch) and not _in_identifier(query, i):
            word_end = _IDENT_REST.match(query, i + 1).end()
            word = query[i:word_end]
            prefix = word.lower()
            if prefix == "u" and query.startswith("&'", word_end):
                prefix, word_end = "u&", word_end + 1
            if prefix in _STRING_PREFIXES and query.startswith("'", word_end):
                i = _quoted_end(query, word_end + 1, "'", backslash=(prefix == "e"))
                out.append(REDACTED)
            else:
                out.append(query[i:word_end])
                i = word_end
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _in_identifier(text: str, i: int) -> bool:
    """Whether position i continues an identifier or number (`a$b$`, `x1`): not a new token."""
    return i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_$")


def _quoted_end(text: str, i: int, quote: str, *, backslash: bool) -> int:
    """The index after the closing quote of a literal whose body starts at i (doubled quotes
    inside; backslash escapes when asked); the end of the text when it never closes."""
    n = len(text)
    while i < n:
        ch = text[i]
        if backslash and ch == "\\":
            i += 2
            continue
        if ch == quote:
            if i + 1 < n and text[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return n


def _block_comment_end(text: str, i: int) -> int:
    depth, i, n = 0, i, len(text)
    while i < n:
        if text.startswith("/*", i):
            depth += 1
            i += 2
        elif text.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n
