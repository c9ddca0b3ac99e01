"""benches.lines: lines of Python per session, the event loop's and the workers' apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from benches.lines import count_lines


def _lines(table: dict[str, float], function: str) -> float:
    return sum(n for where, n in table.items() if where.endswith(" " + function))


def test_counts_the_event_loop_and_the_workers_apart(tmp_path: Path) -> None:
    pytest.importorskip("pypop_maildir")
    counts = count_lines("maildir", "login", sessions=3, users=2, work=tmp_path)
    loop, workers = counts["event loop"], counts["workers"]
    # The engine runs on the event loop; Maildir opens the maildir in a worker thread,
    # once a session: per session, the same lines whatever the number of sessions.
    assert _lines(loop, "ServerConnection.next_event") > 0
    assert _lines(workers, "ServerConnection.next_event") == 0
    assert _lines(workers, "MaildirBackend._open_sync") > 0
    assert _lines(loop, "MaildirBackend._open_sync") == 0
    again = count_lines("maildir", "login", sessions=5, users=2, work=tmp_path / "again")
    for function in ("MaildirBackend._open_sync", "MaildirBackend._listing"):
        assert _lines(again["workers"], function) == _lines(workers, function)


def test_a_download_that_deletes_takes_the_quick_path(tmp_path: Path) -> None:
    """RETR k / DELE k pipelined through the real server: the DELEs are answered in
    answer_fetches with the RETRs, so the general path only sees the RSET more."""
    plain = count_lines("memory", "pipelined", sessions=2, users=2, work=tmp_path / "plain")
    dele = count_lines("memory", "pipelined-dele", sessions=2, users=2, work=tmp_path / "dele")
    general = "ServerConnection._handle_line"
    extra = _lines(dele["event loop"], general) - _lines(plain["event loop"], general)
    assert 0 < extra < 20  # one RSET a session, not 20 DELEs
