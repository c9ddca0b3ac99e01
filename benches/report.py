"""Summaries of the runs: terminal table with pypop/Dovecot ratios, JSON, PNG chart."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_table", "summarize", "write_chart", "write_json"]

BASELINE = "dovecot"
CEILING = "trio-floor"  # benches/floor.py: no POP3 work, the same event loop


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{scenario: {server: {median, min, max, values, unit, cpu_ratio_max, failed}}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        cell = out.setdefault(r["scenario"], {}).setdefault(
            r["server"],
            {
                "values": [],
                "unit": r["unit"],
                "lower_is_better": r["lower_is_better"],
                "cpu_ratios": [],
                "server_util": [],
                "other_util": [],
                "failed": 0,
            },
        )
        if not r["ok"]:
            cell["failed"] += 1
            continue
        if r["value"] is not None:
            cell["values"].append(r["value"])
        ratio = r["result"].get("client_server_cpu_ratio")
        if ratio is not None:
            cell["cpu_ratios"].append(ratio)
        util = r["result"].get("server_cpu_util")
        if util is not None:
            cell["server_util"].append(util)
        other = r["result"].get("server_core_other_util")
        if other is not None:
            cell["other_util"].append(other)
    for cells in out.values():
        for cell in cells.values():
            v = cell["values"]
            cell["median"] = statistics.median(v) if v else None
            cell["min"] = min(v) if v else None
            cell["max"] = max(v) if v else None
            cell["cpu_ratio_max"] = max(cell["cpu_ratios"]) if cell["cpu_ratios"] else None
            cell["server_util_median"] = (
                statistics.median(cell["server_util"]) if cell["server_util"] else None
            )
            cell["other_util_median"] = (
                statistics.median(cell["other_util"]) if cell["other_util"] else None
            )
    return out


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _ratio(r: float) -> str:
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x (1/{1 / r:,.0f})" if r > 0 else "0x"


def _short_ratio(r: float) -> str:
    """The chart's form: 2.24x, or 1/654 for small ratios."""
    return f"{r:.2f}x" if r >= 0.1 else f"1/{1 / r:,.0f}" if r > 0 else "0x"


def direction(lower_is_better: bool) -> str:
    return "lower is better" if lower_is_better else "higher is better"


def _cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    if c["median"] is None:
        return "FAILED"
    s = f"{_num(c['median'])} ({_num(c['min'])}-{_num(c['max'])})"
    if c.get("server_util_median") is not None:
        s += f" @{100 * c['server_util_median']:.0f}%"
    if (c.get("other_util_median") or 0.0) > 0.10:
        s += "!"
    if c["failed"]:
        s += f" {c['failed']} failed"
    return s


def format_table(
    summary: dict[str, dict[str, dict[str, Any]]],
    servers: Sequence[str],
    scenario_order: Sequence[str],
) -> str:
    """Median (min-max) @server-CPU% per server, then pypop/Dovecot ratios of the medians
    and, with the Trio floor in the run, each server's share of the floor's median.

    The server CPU figure is the median share of its one core the server used: well
    under 100% means it was waiting (on the clients, the disk, or a busy machine).
    """
    others = [s for s in servers if s not in (BASELINE, CEILING)]
    has_base = BASELINE in servers
    has_ceiling = CEILING in servers
    head = ["scenario", "unit", *servers]
    if has_base:
        head += [f"{s.removeprefix('pypop-')}/dovecot" for s in others]
    if has_ceiling:
        # What share of the floor each reaches: the host's speed cancels out.
        head += [f"{s.removeprefix('pypop-')}/floor" for s in others]
    head += ["client/server CPU"]
    rows = [head]
    for sc in scenario_order:
        cells = summary.get(sc)
        if not cells:
            continue
        any_cell = next(iter(cells.values()))
        unit = f"{any_cell['unit']} ({direction(any_cell['lower_is_better'])})"
        row = [sc, unit, *(_cell(cells.get(s)) for s in servers)]
        for present, ref in ((has_base, BASELINE), (has_ceiling, CEILING)):
            if not present:
                continue
            base = cells.get(ref, {}).get("median")
            for s in others:
                m = cells.get(s, {}).get("median")
                row.append(_ratio(m / base) if base and m is not None else "-")
        ratios = [c["cpu_ratio_max"] for c in cells.values() if c.get("cpu_ratio_max") is not None]
        row.append(f"{max(ratios):.2f} max" if ratios else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for k, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def write_chart(
    path: Path,
    summary: dict[str, dict[str, dict[str, Any]]],
    servers: Sequence[str],
    scenario_order: Sequence[str],
    title: str,
) -> bool:
    """Bar chart: one panel per scenario, a bar per server (median, min-max whiskers).

    Each panel says which direction is better, and each bar other than Dovecot's carries
    its ratio to Dovecot's median. Returns False (and writes nothing) when matplotlib is
    not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scs = [s for s in scenario_order if s in summary]
    if not scs:
        return False
    cols = min(4, len(scs))
    nrows = (len(scs) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.4 * nrows), squeeze=False)
    colors = {
        "dovecot": "#7f7f7f",
        "pypop-memory": "#1f77b4",
        "pypop-maildir": "#2ca02c",
        "trio-floor": "#d9d9d9",
    }
    for ax, sc in zip(axes.flat, scs, strict=False):
        cells = summary[sc]
        names = [s for s in servers if s in cells]
        med = [cells[s]["median"] or 0.0 for s in names]
        lo = [(cells[s]["median"] or 0.0) - (cells[s]["min"] or 0.0) for s in names]
        hi = [(cells[s]["max"] or 0.0) - (cells[s]["median"] or 0.0) for s in names]
        ax.bar(
            range(len(names)),
            med,
            yerr=[lo, hi],
            capsize=4,
            color=[colors.get(s, "#ff7f0e") for s in names],
        )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([s.replace("pypop-", "pypop\n") for s in names], fontsize=8)
        unit = next(iter(cells.values()))["unit"]
        lower = next(iter(cells.values()))["lower_is_better"]
        base = cells.get(BASELINE, {}).get("median")
        note = f"; (x) = ratio to {BASELINE}" if base and len(names) > 1 else ""
        ax.set_title(f"{sc}: {unit}\n{direction(lower)}{note}", fontsize=9)
        if lower and all(m > 0 for m in med):
            ax.set_yscale("log")  # Dovecot's process per connection dwarfs the rest
        ax.margins(y=0.25)  # room for the labels above the bars
        for i, s in enumerate(names):
            text = "failed" if cells[s]["median"] is None else _num(med[i])
            if base and s != BASELINE and cells[s]["median"] is not None:
                text += f"\n({_short_ratio(med[i] / base)})"
            ax.annotate(text, (i, med[i] or 1), ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(scs) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
