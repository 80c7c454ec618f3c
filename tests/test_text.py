"""rdzvctl.text: untrusted strings shown escaped, JSON with \\u escapes, secrets masked (pure logic)."""

from __future__ import annotations

import json
import sys
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdzvctl import text
from rdzvctl.text import MASK, format_traceback, json_text, register_secret, safe, safe_lines, scrub, visible

#: Every class of character a terminal may interpret or that hides/reorders text.
DANGEROUS = ["\x1b", "\x07", "\x00", "\r", "\n", "\t", "\x08", "\x7f", "\x85", "\x9b", "\x9d", "\u061c",
             "\u200b", "\u200d", "\u200e", "\u202a", "\u202e", "\u2066", "\u2069", "\u2028", "\u2029", "\ufeff",
             "\U000e0001", "\udcff"]


@pytest.fixture(autouse=True)
def no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text, "_SECRETS", set())
    monkeypatch.setattr(text, "_ordered", [])


@pytest.mark.parametrize("ch", DANGEROUS)
def test_dangerous_characters_are_shown_escaped(ch: str) -> None:
    shown = visible(f"a{ch}b")
    assert ch not in shown and shown.isprintable() and shown.isascii()
    assert shown.startswith("a\\") and shown.endswith("b")


def test_escapes_read_like_python() -> None:
    assert visible("x\x1b]0;t\x07\r\n\t\u202e\x9b\U000e0001") == "x\\x1b]0;t\\x07\\r\\n\\t\\u202e\\x9b\\U000e0001"


def test_printable_text_is_unchanged() -> None:
    for sample in ["trainer-0.cluster.local_4100_0", "ノード-1", "naïve café", "emoji 🚀", "[bold]not markup[/]"]:
        assert visible(sample) == sample


def test_every_non_printable_code_point_is_escaped() -> None:
    """Every C0/C1, format (Cf), separator and surrogate of this Python's Unicode database."""
    bad = [chr(c) for c in range(sys.maxunicode + 1)
           if unicodedata.category(chr(c)) in ("Cc", "Cf", "Cs", "Zl", "Zp")]
    joined = "".join(bad)
    shown = visible(joined)
    assert shown.isascii() and shown.isprintable()
    no_surrogates = "".join(ch for ch in bad if unicodedata.category(ch) != "Cs")  # adjacent ones pair up in JSON
    assert json.loads(json_text(no_surrogates)) == no_surrogates
    assert json_text(joined).isascii()


@given(st.text())
def test_json_text_round_trips_and_holds_no_raw_control(value: str) -> None:
    for indent in (None, 2):
        encoded = json_text({"k" + value: [value]}, indent=indent)
        assert json.loads(encoded) == {"k" + value: [value]}
        assert all(ch.isprintable() or ch in "\n " for ch in encoded)


_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(),
                      st.sampled_from(["p://user:pw@host", "password=zz", "\x7f", "\u202e", "\u2028", ""]))
_JSON_VALUE = st.recursive(_JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=9), st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), inner, max_size=9)),
    max_leaves=40)


@given(_JSON_VALUE)
def test_json_pieces_concatenate_to_json_text(value: object) -> None:
    """App.json writes a large document in pieces: together they are exactly json_text's text,
    escapes and masks included (lists and objects cut into slices of 3 members here)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text, "JSON_SLICE", 3)
        assert "".join(text.json_pieces(value)) == json_text(value)


def test_json_pieces_with_secrets_registered_are_one_text() -> None:
    register_secret("s3cr3t-value")
    doc = {"nodes": [{"node": f"s3cr3t-value-{i}"} for i in range(5000)], "a": "s3cr3t-value"}
    assert list(text.json_pieces(doc)) == [json_text(doc)]
    assert "s3cr3t" not in json_text(doc)


def test_json_text_keeps_readable_unicode() -> None:
    assert json_text({"node": "ノード\u202e"}) == '{"node":"ノード\\u202e"}'


def test_safe_lines_keeps_only_its_own_line_breaks() -> None:
    assert safe_lines("one\x1b[2J\ntwo\r") == "one\\x1b[2J\ntwo\\r"
    assert "\n" not in safe("forged\nrdzvctl: all good")


def test_registered_secrets_are_masked_in_every_form() -> None:
    register_secret("p@ss w'rd/x")
    for form in ["p@ss w'rd/x", "p%40ss%20w%27rd%2Fx", "p%40ss+w%27rd%2Fx"]:
        assert scrub(f"args: '{form}' end") == f"args: '{MASK}' end", form
    assert "p@ss" not in json_text({"echo": "p@ss w'rd/x"})


def test_short_secrets_are_masked_by_pattern_only() -> None:
    register_secret("ab")
    assert scrub("a tab") == "a tab"
    assert scrub("redis://:ab@host:1") == f"redis://:{MASK}@host:1"


@pytest.mark.parametrize("line,expected", [
    ("http://root:pw@10.0.0.1:2379", f"http://root:{MASK}@10.0.0.1:2379"),
    ("redis://:p@w@h:6379/0 and more", f"redis://:{MASK}@h:6379/0 and more"),
    ("rediss://user@h:6379", "rediss://user@h:6379"),
    ("conf password=hunter2,ttl=5", f"conf password={MASK},ttl=5"),
    ("?ssl_password=x&db=1", f"?ssl_password={MASK}&db=1"),
    ("sentinel_password=x secret=y", f"sentinel_password={MASK} secret={MASK}"),
])
def test_pattern_masking(line: str, expected: str) -> None:
    assert scrub(line) == expected


def test_pattern_masking_keeps_json_valid() -> None:
    doc = {"a": 'password=ab\\"cd', "b": "x://u:p\\\\q@h"}
    assert json.loads(json_text(doc))["a"].startswith("password=" + MASK)


def test_address_registers_its_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from rdzvctl.backends.base import Address

    monkeypatch.setenv("REDIS_PASSWORD", "from-the-env")
    Address("redis", "redis://u:url%2Fsecret@h:1/0?password=query-secret", "job", {"ssl_password": "key-secret"})
    for secret in ("from-the-env", "url/secret", "url%2Fsecret", "query-secret", "key-secret"):
        assert secret not in scrub(f"echo {secret} echo"), secret


def test_an_address_made_from_another_registers_its_secrets_too() -> None:
    """Address is a named tuple: its own ``_replace`` and ``_make`` (the way to derive one now that
    ``dataclasses.replace`` does not apply) go through the constructor that registers the secrets."""
    from rdzvctl.backends.base import Address

    base = Address("redis", "h:1", "job", {})
    derived = [base._replace(conf={"password": "replaced-secret"}), base._replace(endpoint="redis://u:url-secret@h:1"),
               Address._make(["redis", "h:1", "job", {"ssl_password": "made-secret"}, 5.0])]
    assert all(type(address) is Address for address in derived)
    for secret in ("replaced-secret", "url-secret", "made-secret"):
        assert secret not in scrub(f"echo {secret} echo"), secret
    assert derived[0] == Address("redis", "h:1", "job", {"password": "replaced-secret"})


def test_traceback_is_scrubbed_and_one_line_per_exception() -> None:
    register_secret("hunter22")
    try:
        try:
            raise ValueError("server said: 'hunter22'\nrdzvctl: all good\x1b]0;x\x07")
        except ValueError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        lines = format_traceback(exc)
    joined = "\n".join(lines)
    assert "hunter22" not in joined and "\x1b" not in joined
    assert not any(line.startswith("rdzvctl: all good") for line in lines)
    assert "The above exception was the direct cause of the following exception:" in lines
    assert lines[-1] == "RuntimeError: outer"
    assert any(line.startswith("ValueError: server said: '***'\\nrdzvctl: all good\\x1b]0;x\\x07") for line in lines)
