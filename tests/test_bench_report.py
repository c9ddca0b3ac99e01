"""The suite's table: ratios to Dovecot and shares of the Trio floor."""

from __future__ import annotations

from typing import Any

from benches.report import format_table, summarize


def _run(server: str, value: float) -> dict[str, Any]:
    return {
        "server": server,
        "scenario": "login",
        "repeat": 1,
        "ok": True,
        "value": value,
        "unit": "sessions/s",
        "lower_is_better": False,
        "result": {},
    }


def test_table_gives_ratios_to_dovecot_and_shares_of_the_floor() -> None:
    runs = [_run("dovecot", 200.0), _run("pypop-maildir", 2000.0), _run("trio-floor", 8000.0)]
    runs += [_run("pypop-maildir", 1000.0), _run("pypop-maildir", 3000.0)]
    table = format_table(summarize(runs), ["dovecot", "pypop-maildir", "trio-floor"], ["login"])
    head, _, row = table.splitlines()
    assert head.split() == [
        *("scenario", "unit", "dovecot", "pypop-maildir", "trio-floor"),
        *("maildir/dovecot", "maildir/floor", "client/server", "CPU"),
    ]
    # the medians: 2,000 against Dovecot's 200 and the floor's 8,000
    assert row.split()[-3:] == ["10.00x", "0.25x", "-"]
    assert "2,000 (1,000-3,000)" in row


def test_table_without_the_floor_has_no_share_columns() -> None:
    runs = [_run("dovecot", 200.0), _run("pypop-maildir", 2000.0)]
    table = format_table(summarize(runs), ["dovecot", "pypop-maildir"], ["login"])
    assert "/floor" not in table
    assert table.splitlines()[2].split()[-2:] == ["10.00x", "-"]
