"""rdzvctl report: one Markdown incident report, escape-safe and secret-free, against real servers."""

# ruff: noqa: F811  (pytest fixtures imported by name)
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import stat
import uuid
from typing import List

import pytest

from rdzvctl.backends.base import Address
from rdzvctl.backends.registry import open_backend
from rdzvctl.state.codec import encode
from tests.support.cli import cli_env, invoke  # noqa: F401
from tests.support.redis_server import DEFAULT_PASSWORD, redis_server_auth  # noqa: F401
from tests.support.torch_peer import filestore_path, tcpstore_libuv  # noqa: F401
from tests.test_doctor import make_state, put

HOSTILE = "evil|`rm -rf /`\n## Forged heading\x1b[31m<img src=x onerror=alert(1)>*bold*[link](http://x)\u202e"
SECTIONS = ["# Incident report", "## Summary", "### Nodes", "## Findings", "## Doctor", "## Last events",
            "## Repair commands"]


@pytest.fixture()
def run_id() -> str:
    return f"rep-{uuid.uuid4().hex[:10]}"


def report(*args: str) -> str:
    result = invoke(["report", "--timeout", "5", *args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def flags(endpoint: str, run_id: str) -> List[str]:
    return ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]


def cells(row: str) -> List[str]:
    """A Markdown table row split on its unescaped pipes."""
    return re.split(r"(?<!\\)\|", row.strip())[1:-1]


def test_the_report_has_its_sections_in_order_and_wellformed_tables(tcpstore_libuv, cli_env, run_id):
    state = make_state("localhost", "127.0.0.1")
    state.last_heartbeats[next(iter(state.participants))] -= _dt.timedelta(seconds=60)
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), state)
    text = report(*flags(tcpstore_libuv.endpoint, run_id))
    assert text.startswith(f"# Incident report: run {run_id.replace('_', chr(92) + '_')}\n")
    lines = text.splitlines()
    positions = [next(i for i, line in enumerate(lines) if line == s or line.startswith(s + ":")) for s in SECTIONS]
    assert positions == sorted(positions)
    for block in re.findall(r"((?:^\|.*\|\n)+)", text, re.MULTILINE):
        rows = block.splitlines()
        assert re.fullmatch(r"\|(---\|)+", rows[1])
        assert len({len(cells(r)) for r in rows if not r.startswith("|---")}) == 1, block
    assert "dead-participants" in text  # the finding
    assert "bootstrap.master" in text or "nodes.resolve" in text  # doctor's checklist
    assert "Not available" in text and "watch \\-\\-record" not in text and "watch --record" in text  # no history: TCPStore
    fence = re.search(r"^(`{3,})bash\n(.*?)^\1$", text, re.MULTILINE | re.DOTALL)
    assert fence, text
    assert f"rdzvctl reset --mode prune --rdzv-backend c10d --rdzv-endpoint {tcpstore_libuv.endpoint} " \
           f"--rdzv-id {run_id}" in fence.group(2)


def test_hostile_store_strings_cannot_forge_markdown(tcpstore_libuv, cli_env, run_id):
    state = make_state("localhost", HOSTILE)
    state.last_heartbeats[next(n for n in state.participants if n.addr == HOSTILE)] -= \
        _dt.timedelta(seconds=60)  # dead: it appears in findings and repairs too
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), state)
    text = report(*flags(tcpstore_libuv.endpoint, run_id))
    assert "\x1b" not in text and "\u202e" not in text
    fence = re.search(r"^(`{3,})bash\n(.*?)^\1$", text, re.MULTILINE | re.DOTALL)
    assert fence, text
    prose = text[:fence.start()] + text[fence.end():]  # a code block shows everything literally
    assert "<img" not in prose and "&lt;img" in prose
    assert not any(line.startswith("## Forged") for line in text.splitlines())
    for line in prose.splitlines():
        if line.startswith("|") and "evil" in line:
            assert "\\|" in line and "\\`" in line and "\\*bold\\*" in line and "\\[link\\]" in line
            before = prose[:prose.index(line)].splitlines()[::-1]
            header = next(row for row in before if row.startswith("| ") and "evil" not in row)
            assert len(cells(line)) == len(cells(header))
    # No backtick run inside the repair block can close it.
    assert "`" * len(fence.group(1)) not in fence.group(2)


LINKY = ["https://evil.example/login", "www.evil.com", "WWW.Evil.com/x", "ftp://evil.example",
         "ops@evil.example", "mailto:ops@evil.example", "xmpp:ops@evil.example/x", "(www.evil.com)"]


def _linkable(markdown: str) -> bool:
    """Whether GFM's extended autolinks (www., scheme://, emails) could match anywhere outside a code span."""
    text = re.sub(r"`@`", "", markdown)
    return bool(re.search(r"(?i)www\.|://|@", text))


@pytest.mark.parametrize("value", LINKY)
def test_md_breaks_every_gfm_autolink(value):
    from rdzvctl.report import md

    assert not _linkable(md(value)), md(value)


@pytest.mark.parametrize("value", LINKY)
def test_gfm_renders_no_link_and_the_same_text(value):
    from rdzvctl.report import md

    cmarkgfm = pytest.importorskip("cmarkgfm")  # GitHub's reference renderer, when installed
    out = md(value)
    html = cmarkgfm.github_flavored_markdown_to_html(f"| a |\n|---|\n| {out} |\n\n{out}\n")
    assert "<a " not in html and value.replace("&", "&amp;") in re.sub(r"</?code>", "", html), html


def test_urls_from_the_store_are_not_links_in_the_report(tcpstore_libuv, cli_env, run_id):
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), make_state(*LINKY))
    text = report(*flags(tcpstore_libuv.endpoint, run_id))
    fence = re.search(r"^(`{3,})bash\n(.*?)^\1$", text, re.MULTILINE | re.DOTALL)
    prose = text[:fence.start()] + text[fence.end():] if fence else text
    assert "evil" in prose and not _linkable(prose), prose


def test_no_secret_reaches_the_report(redis_server_auth, cli_env, run_id, tmp_path):
    url = f"redis://:{DEFAULT_PASSWORD}@127.0.0.1:{redis_server_auth.port}/0"
    with open_backend(Address("redis", url, run_id)) as backend:
        assert backend.set_state(encode(make_state("localhost")))[2]
    args = ["--rdzv-backend", "redis", "--rdzv-endpoint", url, "--rdzv-id", run_id]
    markdown = report(*args)
    bundle = report(*args, "-o", "json")
    out = tmp_path / "incident.md"
    report(*args, "--output", str(out))
    for text in (markdown, bundle, out.read_text()):
        assert DEFAULT_PASSWORD not in text
        assert "***" in text or "\\*\\*\\*" in text  # Markdown escapes the mask
    assert "Redis" in markdown  # the server was reached, with the password


def test_json_is_the_same_bundle(tcpstore_libuv, cli_env, run_id):
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), make_state("localhost"))
    doc = json.loads(report(*flags(tcpstore_libuv.endpoint, run_id), "-o", "json"))
    assert doc["schema"] == "rdzvctl.report/v1"
    assert doc["get"]["schema"] == "rdzvctl.get/v1" and doc["doctor"]["schema"] == "rdzvctl.doctor/v1"
    assert doc["events"] is None and isinstance(doc["repairs"], list)
    assert doc["run_id"] == run_id


def test_output_file_is_private_and_never_overwritten_without_force(tcpstore_libuv, cli_env, run_id, tmp_path):
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), make_state("localhost"))
    out = tmp_path / "incident.md"
    out.write_text("keep me")
    os.chmod(out, 0o644)
    refused = invoke(["report", *flags(tcpstore_libuv.endpoint, run_id), "--output", str(out)])
    assert refused.exit_code == 2 and "--force" in refused.stderr
    assert out.read_text() == "keep me"
    report(*flags(tcpstore_libuv.endpoint, run_id), "--output", str(out), "--force")
    assert out.read_text().startswith("# Incident report")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    fresh = tmp_path / "fresh.json"
    report(*flags(tcpstore_libuv.endpoint, run_id), "--output", str(fresh), "-o", "json")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert json.loads(fresh.read_text())["schema"] == "rdzvctl.report/v1"


def test_force_replaces_only_regular_files_atomically_never_the_old_inode(tcpstore_libuv, cli_env, run_id, tmp_path):
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), make_state("localhost"))
    out = tmp_path / "incident.md"
    out.write_text("old")
    os.chmod(out, 0o644)
    other = tmp_path / "hardlink"
    os.link(out, other)
    report(*flags(tcpstore_libuv.endpoint, run_id), "--output", str(out), "--force")
    assert out.read_text().startswith("# Incident report") and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert other.read_text() == "old" and stat.S_IMODE(other.stat().st_mode) == 0o644  # the old inode is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hardlink", "incident.md"]  # no temp file left
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o644)
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    for path in (fifo, link, tmp_path, "/dev/null"):
        before = os.lstat(path)
        refused = invoke(["report", "--timeout", "5", *flags(tcpstore_libuv.endpoint, run_id), "--output", str(path),
                          "--force"])
        assert refused.exit_code == 2, (path, refused.stderr)
        assert "not a regular file" in refused.stderr or "is a directory" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert target.read_text() == "keep"


def test_force_never_replaces_the_runs_own_filestore(filestore_path, cli_env, run_id, tmp_path):
    put(Address("c10d", filestore_path, run_id, {"store_type": "file"}), make_state("localhost"))
    before = open(filestore_path, "rb").read()
    args = ["--rdzv-backend", "c10d", "--rdzv-endpoint", filestore_path, "--rdzv-id", run_id,
            "--rdzv-conf", "store_type=file"]
    refused = invoke(["report", "--timeout", "5", *args, "--output", filestore_path, "--force"])
    assert refused.exit_code == 2 and "store file" in refused.stderr, refused.stderr
    assert open(filestore_path, "rb").read() == before
    link = tmp_path / "other-name"
    os.link(filestore_path, link)  # the same file under another name
    refused = invoke(["report", "--timeout", "5", *args, "--output", str(link), "--force"])
    assert refused.exit_code == 2 and open(filestore_path, "rb").read() == before


def test_a_corrupt_state_is_reported_and_doctor_fails(tcpstore_libuv, cli_env, run_id):
    from rdzvctl.backends.tcpstore import TcpStoreClient

    host, port = tcpstore_libuv.endpoint.rsplit(":", 1)
    with TcpStoreClient(host, int(port)) as client:
        client.set(f"/torch.rendezvous.{run_id}", b"not base64 |`<x>`")
        assert client.check([f"/torch.rendezvous.{run_id}"])
    text = report(*flags(tcpstore_libuv.endpoint, run_id))
    assert "The state does not decode." in text and "state-corrupt" in text
    assert "rdzvctl reset --mode clear --rdzv-backend c10d" in text
    result = invoke(["doctor", *flags(tcpstore_libuv.endpoint, run_id), "-o", "json"])
    assert result.exit_code == 1
    assert {c["name"]: c["status"] for c in json.loads(result.stdout)["checks"]}["run.state"] == "fail"


def test_last_events_come_from_a_filestore_history(tmp_path, cli_env, run_id):
    from rdzvctl.backends.filestore import FileStore

    path = str(tmp_path / "store")
    FileStore(path, create=True).set(b"/x", b"")
    address = Address("c10d", path, run_id, {"store_type": "file"})
    state = make_state("localhost", "127.0.0.1")
    put(address, state)
    later = state.copy()
    later.round += 1
    with open_backend(address) as backend:
        current = backend.get_state()
        assert current is not None and backend.set_state(encode(later), current[1])[2]
    args = ["--rdzv-backend", "c10d", "--rdzv-endpoint", path, "--rdzv-id", run_id, "--rdzv-conf", "store_type=file"]
    doc = json.loads(report(*args, "-o", "json"))
    kinds = [e["kind"] for e in doc["events"]]
    assert kinds[0] == "state-created" and "round-advanced" in kinds and doc["events_note"] == ""
    text = report(*args)
    section = text.split("## Last events", 1)[1].split("## Repair", 1)[0]
    assert "round\\-advanced" in section or "round-advanced" in section


def test_last_events_never_fail_the_report_even_on_a_bug() -> None:
    """A report is written during an incident: a history that breaks in an unforeseen way becomes the note."""
    from rdzvctl.testing.memory import MemoryBackend
    from rdzvctl.timeline import last_events

    class Broken(MemoryBackend):
        def history(self):  # type: ignore[override]
            raise RuntimeError("boom \x1b[31m")

    backend = Broken(Address("memory", "memory://report", "job42", {}))
    events, note = last_events(backend)
    assert events is None and "internal error: RuntimeError" in note and "boom" in note


def test_last_events_on_a_tcpstore_say_how_to_record_one(tcpstore_libuv) -> None:
    """No history kept: the note is the backend's own reason, with what to do instead."""
    from rdzvctl.timeline import last_events

    with open_backend(Address("c10d", tcpstore_libuv.endpoint, "job42", {})) as backend:
        events, note = last_events(backend)
    assert events is None and "keeps no history" in note and "watch --record" in note
