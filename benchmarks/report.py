"""Turn cell results into a markdown table, JSON, and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from .cell import SCENARIOS

BASELINE = "diskcache"


def save_outputs(out: str | None, save: bool, saved: Path, stem: str, text: str, result: Any) -> None:
    """Write ``stem``.md (``text``) and ``stem``.json (``result``): to
    ``saved`` with ``--save``, to ``out`` with ``--out DIR``, else nowhere."""
    where = saved if save else (Path(out) if out else None)
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
        (where / f"{stem}.md").write_text(text, encoding="utf-8")
        (where / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def environment(workdir: str) -> dict[str, Any]:
    import dbm

    import sessionkit  # noqa: F401  (its version, when it is not pip-installed)

    versions = {}
    for module in ("sessionkit", "msgpack", "filelock", "diskcache", "sqlitedict", "telebot", "cachelib"):
        try:
            from importlib.metadata import version

            dist = {"telebot": "pyTelegramBotAPI"}.get(module, module)
            versions[module] = version(dist)
        except Exception:
            mod = sys.modules.get(module)
            versions[module] = getattr(mod, "__version__", "not installed") if mod else "not installed"
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "dbm": dbm._defaultmod.__name__ if getattr(dbm, "_defaultmod", None) else _default_dbm(),
        "filesystem": filesystem_of(workdir),
        "packages": versions,
    }


def _default_dbm() -> str:
    import dbm

    for name in dbm._names:  # type: ignore[attr-defined]
        try:
            __import__(name)
            return name
        except ImportError:
            continue
    return "none"


def filesystem_of(path: str) -> str:
    """The filesystem type of ``path``, from /proc/mounts where there is one."""
    best, kind = "", "unknown"
    path = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) > len(best):
                        best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def summarise(cell: dict[str, Any]) -> dict[str, Any]:
    us = cell.get("us_per_op") or []
    if not us:
        return cell
    median = statistics.median(us)
    out = {**cell, "median_us": median, "min_us": min(us), "max_us": max(us), "ops_s": 1e6 / max(median, 1e-9)}
    if cell.get("solo_us_per_op"):
        # (h): two processes alternating (hand-off subtracted) over one process, medians
        solo, pair = cell["solo_us_per_op"], cell["pair_us_per_op"]
        solo_median = statistics.median(solo)
        out.update(
            solo_median_us=solo_median, solo_min_us=min(solo), solo_max_us=max(solo),
            pair_median_us=statistics.median(pair), pair_min_us=min(pair), pair_max_us=max(pair),
            sync_median_us=statistics.median(cell["sync_us_per_op"]),
            ratio_2p_1p=median / solo_median,
            raw_ratio_2p_1p=statistics.median(pair) / solo_median,
        )
        if cell.get("solo_cpu_us_per_op"):
            handoff = statistics.median(cell["sync_cpu_us_per_op"])
            cpu_net = [p - handoff for p in cell["pair_cpu_us_per_op"]]
            out.update(
                solo_cpu_median_us=statistics.median(cell["solo_cpu_us_per_op"]),
                cpu_median_us=statistics.median(cpu_net),
            )
            out["cpu_ratio_2p_1p"] = out["cpu_median_us"] / out["solo_cpu_median_us"]
        if cell.get("pair_inop_us_per_op"):
            # the time inside the operations alone: no hand-off to subtract
            out.update(
                solo_inop_median_us=statistics.median(cell["solo_inop_us_per_op"]),
                inop_median_us=statistics.median(cell["pair_inop_us_per_op"]),
            )
            out["inop_ratio_2p_1p"] = out["inop_median_us"] / out["solo_inop_median_us"]
    return out


def _fmt_int(n: float) -> str:
    return f"{n:,.0f}"


def _unmeasured_row(name: str, cell: dict[str, Any], timed: str, columns: int) -> str | None:
    """The table row of a cell that was skipped or has no ``timed`` figure, else None."""
    if cell.get("skipped"):
        why = f"skipped: {cell['skipped']}"
    elif timed not in cell:
        why = f"failed: {cell.get('failure', 'no timing')}"
    else:
        return None
    return f"| {name} | {why} |" + " |" * (columns - 2)


def _lost_and_errors(cell: dict[str, Any]) -> tuple[str, str]:
    lost = "–" if cell.get("lost") is None else _fmt_int(cell["lost"])
    errors = _fmt_int(cell["errors"]) + (f" ({cell['first_error'][:60]})" if cell["errors"] else "")
    return lost, errors


def markdown(cells: list[dict[str, Any]], env: dict[str, Any], settings: dict[str, Any]) -> str:
    cells = [summarise(c) for c in cells]
    out = ["# sessionkit benchmarks", ""]
    out.append(
        f"Python {env['python']} ({env['implementation']}) on {env['platform']}, {env['cpus']} CPUs; "
        f"default dbm `{env['dbm']}`; filesystem `{env['filesystem']}`."
    )
    out.append("Packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + ".")
    out.append(
        f"Each cell ran in a fresh process: a warm-up, then {settings['repeat']} repetitions of up to "
        f"{settings['ops']:,} operations (or {settings['seconds']} s). µs/op is the median, with the "
        "fastest and slowest repetition beside it; `× diskcache` is ops/s divided by diskcache's in the "
        "same scenario. Lost updates: increments that did not survive (only libraries without an "
        "atomic update lose any)."
    )
    out.append("")
    order = list(SCENARIOS)
    for scenario in order:
        rows = [c for c in cells if c["scenario"] == scenario]
        if not rows:
            continue
        sizes = sorted({c["size"] for c in rows})
        for size in sizes:
            group = [c for c in rows if c["size"] == size]
            title = SCENARIOS[scenario] if scenario not in ("e", "h") else f"{SCENARIOS[scenario]}, N = {size:,}"
            out.append(f"## ({scenario}) {title}")
            out.append("")
            if scenario == "h":
                out.extend(alternation_table(group))
                continue
            out.append("| subject | ops/s | µs/op (min–max) | × diskcache | lost updates | errors | peak RSS MB | bytes on disk |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
            base = next((c for c in group if c["subject"] == BASELINE and "ops_s" in c), None)
            ranked = sorted(group, key=lambda c: -c.get("ops_s", -1))
            for c in ranked:
                unmeasured = _unmeasured_row(c["name"], c, "ops_s", 8)
                if unmeasured:
                    out.append(unmeasured)
                    continue
                ratio = f"{c['ops_s'] / base['ops_s']:.2f}" if base else "–"
                lost, errors = _lost_and_errors(c)
                out.append(
                    f"| {c['name']} | {_fmt_int(c['ops_s'])} | {c['median_us']:.1f} "
                    f"({c['min_us']:.1f}–{c['max_us']:.1f}) | {ratio} | {lost} | {errors} | "
                    f"{c['rss_mb']:.0f} | {_fmt_int(c['disk_bytes'])} |"
                )
            out.append("")
    out.extend(headline(cells))
    return "\n".join(out) + "\n"


def alternation_table(group: list[dict[str, Any]]) -> list[str]:
    """Scenario (h): one process, two strictly alternating, the hand-off alone, and the ratio."""
    out = [
        "Two worker processes, the same random keys: first one process alone (*1 process*); then the "
        "two taking turns through a pipe, so every operation follows a write by the other process "
        "(*2 processes*: wall time over both processes' operations), each such pass followed by the "
        "same turn-taking around a no-op (*hand-off*), whose median is subtracted "
        "(*2p − hand-off*).  *2p/1p* is median (2p − hand-off) / median 1p, with the raw 2p / 1p in "
        "brackets.  The *CPU* columns divide CPU time instead of wall time (both workers' in the "
        "alternating passes, hand-off subtracted): other load on the machine moves them far less, but "
        "they leave out time spent blocked (on the disk, on a lock), so where 2p's wall time is well "
        "above its CPU time the wall-time ratio is the one that counts.",
        "",
        "| subject | 1 process µs/op (min–max) | 2 processes µs/op (min–max) | hand-off µs/op "
        "| 2p − hand-off µs/op | 2p/1p (raw) | CPU µs/op 1p, 2p | CPU 2p/1p "
        "| in-op µs/op 1p, 2p | in-op 2p/1p "
        "| lost updates | errors | peak RSS MB | bytes on disk |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ranked = sorted(group, key=lambda c: c.get("ratio_2p_1p", float("inf")))
    for c in ranked:
        name = c["name"] + (f" (`{c['dbm']}`)" if c.get("dbm") else "")
        unmeasured = _unmeasured_row(name, c, "solo_median_us", 14)
        if unmeasured:
            out.append(unmeasured)
            continue
        lost, errors = _lost_and_errors(c)
        out.append(
            f"| {name} | {c['solo_median_us']:.1f} ({c['solo_min_us']:.1f}–{c['solo_max_us']:.1f}) "
            f"| {c['pair_median_us']:.1f} ({c['pair_min_us']:.1f}–{c['pair_max_us']:.1f}) "
            f"| {c['sync_median_us']:.1f} | {c['median_us']:.1f} "
            f"| **{c['ratio_2p_1p']:.2f}** ({c['raw_ratio_2p_1p']:.2f}) "
            + (f"| {c['solo_cpu_median_us']:.1f}, {c['cpu_median_us']:.1f} | {c['cpu_ratio_2p_1p']:.2f} "
               if "cpu_ratio_2p_1p" in c else "| – | – ")
            + (f"| {c['solo_inop_median_us']:.1f}, {c['inop_median_us']:.1f} | {c['inop_ratio_2p_1p']:.2f} "
               if "inop_ratio_2p_1p" in c else "| – | – ")
            + f"| {lost} | {errors} "
            f"| {c['rss_mb']:.0f} | {_fmt_int(c['disk_bytes'])} |"
        )
    return out + [""]


def _find(cells: list[dict[str, Any]], scenario: str, subject: str, size: int = 0) -> dict[str, Any] | None:
    for c in cells:
        if c["scenario"] == scenario and c["subject"] == subject and c["size"] == size and "ops_s" in c:
            return c
    return None


def headline(cells: list[dict[str, Any]]) -> list[str]:
    """The ratios the project's targets are stated in, where measured."""
    cells = [summarise(c) for c in cells]
    lines = ["## Ratios", ""]

    def ratio(label: str, num: Any, den: Any, target: str) -> None:
        if num and den:
            lines.append(f"- {label}: **{num / den:.2f}** ({target})")

    for backend in ("msgpack", "shelve", "memory"):
        a = _find(cells, "a", backend)
        d = _find(cells, "d", backend)
        dc_a, dc_d = _find(cells, "a", BASELINE), _find(cells, "d", BASELINE)
        if a and dc_a:
            ratio(f"{a['name']} vs diskcache, 1 thread 1 key (ops/s)", a["ops_s"], dc_a["ops_s"], "higher is better")
        if d and dc_d:
            ratio(f"{d['name']} vs diskcache, 4 processes 1 key (ops/s)", d["ops_s"], dc_d["ops_s"], f"lost updates: {d['lost']}")
    floor = _find(cells, "a", "floor-dict")
    mem = _find(cells, "a", "memory")
    if floor and mem:
        ratio(
            "sessionkit memory vs floor dict + Lock, both called through a subject method (µs/op)",
            mem["median_us"], floor["median_us"],
            "lower is better; `python -m benchmarks.core` times the bare hot path",
        )
    replace = _find(cells, "a", "floor-replace")
    mp = _find(cells, "a", "msgpack")
    if replace and mp:
        ratio("sessionkit msgpack vs floor msgpack temp+replace (µs/op)", mp["median_us"], replace["median_us"], "lower is better")
    sizes = sorted({c["size"] for c in cells if c["scenario"] == "e"})
    for size in sizes:
        ours, naive = _find(cells, "e", "shelve", size), _find(cells, "e", "shelve-filelock", size)
        if ours and naive:
            ratio(
                f"sessionkit shelve vs shelve + filelock opened per operation, N = {size:,} (ops/s)",
                ours["ops_s"], naive["ops_s"], "higher is better",
            )
    for backend in ("msgpack", "shelve", "shelve-gnu", "shelve-sqlite3", "diskcache"):
        small = next((_find(cells, "e", backend, s) for s in sizes if _find(cells, "e", backend, s)), None)
        big = next((_find(cells, "e", backend, s) for s in reversed(sizes) if _find(cells, "e", backend, s)), None)
        if small and big and small is not big:
            ratio(
                f"{big['name']}: µs/op at N = {big['size']:,} vs N = {small['size']:,}",
                big["median_us"], small["median_us"], f"peak RSS {big['rss_mb']:.0f} MB, "
                f"{big['disk_bytes'] / max(big['size'], 1):.0f} bytes on disk per session",
            )
    alternated = sorted({c["size"] for c in cells if c["scenario"] == "h"})
    for backend in ("msgpack", "shelve", "shelve-gnu", "shelve-sqlite3", "diskcache"):
        for size in alternated:
            h = _find(cells, "h", backend, size)
            if h:
                lines.append(
                    f"- {h['name']}: 2 processes alternating vs 1 process, N = {size:,} (µs/op, hand-off "
                    f"subtracted): **{h['ratio_2p_1p']:.2f}** (target ≤ 2; {h['median_us']:.1f} vs "
                    f"{h['solo_median_us']:.1f} µs/op; raw {h['raw_ratio_2p_1p']:.2f}"
                    + (f"; CPU time {h['cpu_ratio_2p_1p']:.2f}" if "cpu_ratio_2p_1p" in h else "") + ")"
                )
                if "inop_ratio_2p_1p" in h:
                    lines.append(
                        f"- {h['name']}: 2 processes alternating vs 1 process, N = {size:,} (time inside the "
                        f"operations): **{h['inop_ratio_2p_1p']:.2f}** (target ≤ 2; {h['inop_median_us']:.1f} vs "
                        f"{h['solo_inop_median_us']:.1f} µs/op)"
                    )
        small = next((_find(cells, "h", backend, s) for s in alternated if _find(cells, "h", backend, s)), None)
        big = next((_find(cells, "h", backend, s) for s in reversed(alternated) if _find(cells, "h", backend, s)), None)
        if small and big and small is not big:
            cpu = (f"; CPU time {big['solo_cpu_median_us'] / small['solo_cpu_median_us']:.2f}"
                   if "solo_cpu_median_us" in big and "solo_cpu_median_us" in small else "")
            ratio(
                f"{big['name']}: 1 process, µs/op at N = {big['size']:,} vs N = {small['size']:,} (scenario h)",
                big["solo_median_us"], small["solo_median_us"], f"target ≤ 1.5{cpu}",
            )
    return lines + [""]


def write_json(path: str, cells: list[dict[str, Any]], env: dict[str, Any], settings: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "settings": settings, "cells": [summarise(c) for c in cells]}, f, indent=1)


def write_chart(path: str, cells: list[dict[str, Any]]) -> str | None:
    """A PNG: ops/s per subject for each scenario, and µs/op against N."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart"
    cells = [summarise(c) for c in cells if "us_per_op" in c]
    flat = [s for s in SCENARIOS if s not in ("e", "h") and any(c["scenario"] == s for c in cells)]
    has_e = any(c["scenario"] == "e" for c in cells)
    has_h = any(c["scenario"] == "h" for c in cells)
    panels = len(flat) + (1 if has_e else 0) + (1 if has_h else 0)
    if not panels:
        return "nothing to chart"
    cols = 2
    rows = (panels + 1) // 2
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.6 * rows), squeeze=False)
    names = sorted({c["name"] for c in cells})
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    for ax, scenario in zip(axes.flat, flat):
        rows_ = sorted((c for c in cells if c["scenario"] == scenario), key=lambda c: c["ops_s"])
        ax.barh([c["name"] for c in rows_], [c["ops_s"] for c in rows_], color=[colors[c["name"]] for c in rows_])
        values = [c["ops_s"] for c in rows_]
        log = max(values) / max(min(values), 1e-9) >= 10
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        scale = ", log scale" if log else ""
        ax.set_title(f"({scenario}) {SCENARIOS[scenario]}: ops/s{scale}", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        for c in rows_:
            if c.get("lost"):
                ax.text(c["ops_s"], c["name"], f"  lost {c['lost']:,}", va="center", fontsize=7, color="red")
    if has_e:
        ax = list(axes.flat)[len(flat)]
        for name in names:
            pts = sorted((c["size"], c["median_us"]) for c in cells if c["scenario"] == "e" and c["name"] == name)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=colors[name])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sessions stored (N)")
        ax.set_title("(e) µs/op after prefilling N sessions, log-log", fontsize=10)
        ax.legend(fontsize=7)
    if has_h:
        ax = list(axes.flat)[len(flat) + (1 if has_e else 0)]
        for name in names:
            pts = sorted((c["size"], c["solo_median_us"], c["median_us"]) for c in cells
                         if c["scenario"] == "h" and c["name"] == name)
            if pts:
                xs = [p[0] for p in pts]
                ax.plot(xs, [p[1] for p in pts], marker="o", label=name, color=colors[name])
                ax.plot(xs, [max(p[2], 1e-3) for p in pts], marker="x", linestyle="--", color=colors[name])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sessions stored (N)")
        ax.set_title("(h) µs/op, 1 process (solid) vs 2 alternating minus hand-off (dashed), log-log", fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
