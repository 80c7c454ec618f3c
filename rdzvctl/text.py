"""Untrusted text made safe to show, and secrets kept out of everything rdzvctl prints.

Every string that reaches a terminal, a pipe or a file may come from a store
(node addresses, run ids, store keys) or a server (error texts), so it passes
one of these on its way out:

* :func:`safe` (:func:`scrub` then :func:`visible`) for one value or one
  line: control characters (C0, DEL, C1 such as the CSI U+009B), format and
  bidi characters (U+202E, zero-width ones), line and paragraph separators
  and every other character Python does not call printable are shown
  escaped (``\\x1b``, ``\\u202e``, ``\\r``, ``\\n``), never interpreted, so a
  value can neither drive the terminal nor forge a line;
* :func:`safe_lines` for a block whose line breaks are rdzvctl's own;
* :func:`json_text` for ``-o json``: the same characters as ``\\uXXXX``
  escapes (``json.dumps(ensure_ascii=False)`` keeps them raw), so the
  document parses to the exact data.

:func:`scrub` masks secrets: every value registered with
:func:`register_secret` (``Address`` registers the passwords of the
invocation when it is made: ``--rdzv-conf`` options, the endpoint's URL
userinfo and query, the password variables of redis and etcd), in the forms
it can take in a message (as is, URL-quoted, JSON- and repr-escaped), plus
any URL userinfo password (``scheme://user:***@``) and ``password=...``-style
option.  Secrets shorter than :data:`MIN_SECRET` characters are masked by
those patterns only: masking every occurrence of a one-letter password would
mask half of every line.
"""

from __future__ import annotations

import json
import re
import reprlib
from itertools import islice
from typing import Any, Dict, Iterator, List, Mapping, Optional, Pattern, Sequence, Set

__all__ = [
    "MASK",
    "MIN_SECRET",
    "visible",
    "safe",
    "safe_lines",
    "json_text",
    "json_pieces",
    "scrub",
    "register_secret",
    "register_address_secrets",
    "is_secret_option",
    "format_traceback",
    "excerpt",
    "cut",
]

MASK = "***"
MIN_SECRET = 3

#: ``--rdzv-conf`` options (and URL query parameters) whose values are secrets.
_SECRET_OPTION = re.compile(r"pass|secret|token|credential", re.IGNORECASE)
#: Variables rdzvctl reads (or redis-cli / etcdctl users commonly set) that hold passwords.
SECRET_ENVIRONMENT = ("REDIS_PASSWORD", "REDISCLI_AUTH", "ETCD_PASSWORD", "ETCDCTL_PASSWORD")

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SECRETS: Set[str] = set()
_ordered: List[str] = []
_patterns: List[Pattern[str]] = []


def _compiled() -> List[Pattern[str]]:
    """Compiled on first use: ``rdzvctl --help`` and plain ASCII output never pay for them."""
    if not _patterns:
        _patterns.extend([
            re.compile(r"[^ -~]+"),  # 0: anything but printable ASCII
            re.compile(r"[\x7f-\U0010ffff]+"),  # 1: what JSON text may hold raw that needs a look
            # 2: URL userinfo with a password: scheme://user:password@
            re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/@:'\"]*:)[^\s/'\"]*@"),
            # 3: password=..., ssl_password=..., secret=... (conf and query forms); never eats a backslash,
            # so a JSON escape is never cut in half
            re.compile(r"(?i)([A-Za-z0-9_]*(?:pass(?:word|wd|phrase)?|secret)=)[^\s,&'\"\\]+"),
        ])
    return _patterns


def _escape(ch: str) -> str:
    if ch.isprintable():
        return ch
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def visible(text: Any) -> str:
    """``text`` with every non-printable character escaped; one line, nothing a terminal interprets."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    return _compiled()[0].sub(lambda m: "".join(map(_escape, m.group())), s)


#: :func:`excerpt`'s cut: strings, numbers and other values to about 40 characters, containers to 4
#: items, 2 levels deep; the whole to :data:`EXCERPT_CHARS`.
_EXCERPT = reprlib.Repr()
_EXCERPT.maxstring = _EXCERPT.maxlong = _EXCERPT.maxother = 40
_EXCERPT.maxlist = _EXCERPT.maxtuple = _EXCERPT.maxdict = _EXCERPT.maxset = 4
_EXCERPT.maxlevel = 2
EXCERPT_CHARS = 120


def excerpt(value: Any) -> str:
    """``repr(value)`` cut to at most :data:`EXCERPT_CHARS` characters (``reprlib``:
    ``'AAAA...AAAA'``), for quoting an untrusted value in a message; still pass the message
    through :func:`safe` to print it."""
    return cut(_EXCERPT.repr(value), EXCERPT_CHARS, "...")


def cut(text: str, limit: int, mark: str = "\u2026") -> str:
    """``text`` if it has at most ``limit`` characters, else its start and ``mark`` in ``limit`` characters."""
    return text if len(text) <= limit else text[:limit - len(mark)] + mark


def safe(text: Any) -> str:
    """One untrusted value or line, ready to print: secrets masked, then :func:`visible`."""
    return visible(scrub(text if isinstance(text, str) else str(text)))


def safe_lines(text: str) -> str:
    """A block of rdzvctl's own lines: like :func:`safe` per line, the line breaks kept."""
    text = scrub(text)
    if "\n" not in text:
        return visible(text)
    return "\n".join(map(visible, text.split("\n")))


def _json_escape(ch: str) -> str:
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


#: The encoders of :func:`json_text` by indent (``None``: compact, one line).
_ENCODERS: Dict[Optional[int], json.JSONEncoder] = {
    None: json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))}


def json_text(obj: Any, indent: Optional[int] = None) -> str:
    """``obj`` as JSON text: UTF-8 kept readable, but non-printable characters as ``\\u`` escapes.

    ``json.dumps`` already escapes C0 controls; DEL, C1, format/bidi
    characters and separators only ever occur inside strings, so escaping
    them in the text keeps the document valid and equal.  ASCII documents
    (the usual case) are checked in constant time.
    """
    if _ordered:
        obj = _scrub_tree(obj)
    encoder = _ENCODERS.get(indent or None)
    if encoder is None:  # what json.dumps(obj, ...) builds at every call, made once per layout
        encoder = _ENCODERS[indent] = json.JSONEncoder(indent=indent, ensure_ascii=False)
    text = _scrub_patterns(encoder.encode(obj))
    if text.isascii():
        return text.replace("\x7f", "\\u007f") if "\x7f" in text else text
    return _compiled()[1].sub(lambda m: "".join(map(_json_escape, m.group())), text)


#: :func:`json_pieces` writes a list or an object of more members than this in slices of them.
JSON_SLICE = 1024


def json_pieces(obj: Any) -> Iterator[str]:
    """:func:`json_text` of ``obj`` (compact) in pieces whose concatenation is exactly that text.

    Large lists and objects come a slice of :data:`JSON_SLICE` members at a time, so a
    document of 65,536 nodes is never one 20 MB string (nor the encoder's chunks of it).
    Each piece is :func:`json_text` of a part: its escapes and masks act within one string
    of the document (the patterns never cross a ``"``), so they are the same.  With secrets
    registered the tree is masked first as a whole (a masked key may merge two): one piece.
    """
    if _ordered:
        yield json_text(obj)
        return
    yield from _pieces(obj)


def _pieces(value: Any) -> Iterator[str]:
    kind = type(value)
    if kind is list and len(value) > JSON_SLICE:
        yield "["
        for start in range(0, len(value), JSON_SLICE):
            yield ("," if start else "") + json_text(value[start:start + JSON_SLICE])[1:-1]
        yield "]"
    elif kind is dict and len(value) > JSON_SLICE:
        items = iter(value.items())
        yield "{"
        for start in range(0, len(value), JSON_SLICE):
            yield ("," if start else "") + json_text(dict(islice(items, JSON_SLICE)))[1:-1]
        yield "}"
    elif kind is dict and value:  # a document's few fields: the large ones in slices, the rest together
        yield "{"
        comma = ""
        small: Dict[Any, Any] = {}
        for key, member in value.items():
            if type(member) in (list, dict) and len(member) > JSON_SLICE:
                if small:
                    yield comma + json_text(small)[1:-1]
                    small, comma = {}, ","
                yield comma + json_text({key: None})[1:-5]  # '"key":'
                comma = ","
                yield from _pieces(member)
            else:
                small[key] = member
        if small:
            yield comma + json_text(small)[1:-1]
        yield "}"
    else:
        yield json_text(value)


def scrub(text: str, extra: Sequence[str] = ()) -> str:
    """``text`` with every registered secret and any URL-userinfo or ``password=`` secret masked.

    ``extra`` secrets (e.g. a backend's own passwords) are masked whatever their length.
    """
    for secret in extra:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    for secret in _ordered:
        if secret in text:
            text = text.replace(secret, MASK)
    return _scrub_patterns(text)


_SECRET_WORDS = ("pass", "Pass", "PASS", "secret", "Secret", "SECRET")


def _scrub_patterns(text: str) -> str:
    """The pattern half of :func:`scrub`; substring checks first keep big documents cheap."""
    if "@" in text and "://" in text:
        text = _compiled()[2].sub(r"\1" + MASK + "@", text)
    if "=" in text and any(word in text for word in _SECRET_WORDS):
        text = _compiled()[3].sub(r"\1" + MASK, text)
    return text


def _scrub_tree(obj: Any) -> Any:
    """A JSON-able value with the registered secrets masked in every string (keys included)."""
    if isinstance(obj, str):
        for secret in _ordered:
            if secret in obj:
                obj = obj.replace(secret, MASK)
        return obj
    if isinstance(obj, dict):
        return {_scrub_tree(k): _scrub_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub_tree(v) for v in obj]
    return obj


def register_secret(value: Optional[str]) -> None:
    """Mask ``value`` wherever it appears in what this process prints from now on."""
    if not value or len(value) < MIN_SECRET or value in _SECRETS:
        return
    from urllib.parse import quote, quote_plus

    forms = {value, quote(value, safe=""), quote_plus(value, safe=""), json.dumps(value, ensure_ascii=False)[1:-1],
             repr(value)[1:-1], visible(value)}
    _SECRETS.add(value)
    _SECRETS.update(f for f in forms if len(f) >= MIN_SECRET)
    _ordered[:] = sorted(_SECRETS, key=len, reverse=True)  # longest first: a secret inside another


def is_secret_option(name: str) -> bool:
    """True for an option name whose value is a secret (``password``, ``ssl_password``, ...)."""
    return bool(_SECRET_OPTION.search(name))


def register_address_secrets(endpoint: str, conf: Mapping[str, str], environ: Mapping[str, str]) -> None:
    """Register the secrets of one address: conf options, URL userinfo and query, password variables."""
    for key, value in conf.items():
        if is_secret_option(key):
            register_secret(value)
    if "@" in endpoint or "=" in endpoint:
        for item in endpoint.split(","):
            _register_url(item.strip())
    for name in SECRET_ENVIRONMENT:
        register_secret(environ.get(name))
    user = environ.get("ETCDCTL_USER")  # etcdctl's user:password form
    if user and ":" in user:
        register_secret(user.partition(":")[2])


def _register_url(item: str) -> None:
    from urllib.parse import parse_qsl, unquote, urlsplit

    if "://" not in item:
        item = "//" + item
    try:
        parts = urlsplit(item)
        password = parts.password
    except ValueError:
        password = None
        parts = None
    if password:
        register_secret(password)
        register_secret(unquote(password))
    elif "@" in item:  # not a URL urlsplit understands: whatever sits between the last ':' and the '@'
        userinfo = item.rpartition("@")[0].rpartition("//")[2]
        if ":" in userinfo:
            register_secret(userinfo.partition(":")[2])
    if parts is not None and parts.query:
        for key, value in parse_qsl(parts.query):
            if is_secret_option(key):
                register_secret(value)


def format_traceback(error: BaseException) -> List[str]:
    """The traceback of ``error`` and its chained causes, each line made :func:`safe`.

    Formatted here rather than by :mod:`traceback` so that exception texts
    (which may hold a server's echo of a password, or control characters)
    are scrubbed and kept to one line each.
    """
    import traceback

    chain: List[List[Any]] = []
    seen: Set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append([current, None])
        if current.__cause__ is not None:
            chain[-1][1] = "The above exception was the direct cause of the following exception:"
            current = current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            chain[-1][1] = "During handling of the above exception, another exception occurred:"
            current = current.__context__
        else:
            current = None
    lines: List[str] = []
    for exc, link in reversed(chain):
        if link is not None:
            lines += ["", link, ""]
        if exc.__traceback__ is not None:
            lines.append("Traceback (most recent call last):")
            for chunk in traceback.format_tb(exc.__traceback__):
                lines += safe_lines(chunk.rstrip("\n")).split("\n")
        lines.append(_exception_line(exc))
        for note in getattr(exc, "__notes__", None) or ():
            lines.append(safe(note))
    return lines


def _exception_line(exc: BaseException) -> str:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the traceback
        message = "<exception str() failed>"
    return f"{name}: {safe(message)}" if message else name

