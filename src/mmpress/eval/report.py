"""Reports of a bench record (:func:`mmpress.eval.bench.run_bench`): terminal table, JSON, markdown,
a Pareto plot (quality vs kept tokens and vs measured prefill speedup) and a self-contained HTML page.

Every view bolds the best press at each budget, by the record's quality metric (accuracy on
labelled data, else agreement with the unpressed model), ties broken by agreement, then by the
lower first-token KL. Accuracy and agreement come with their 95% bootstrap intervals over the
questions (``0.83 [0.75, 0.90]``; the 80-column table: ``0.83±0.08``, half the interval's width,
and error bars in the plot), and each press with its paired difference to its budget's winner
(``vs best``), so a reader sees which differences the sample size can tell apart.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

HEADERS = ("press", "keep", "kept/img", "avg/img", "accuracy", "agreement", "vs best", "KL", "FLOPs/sample",
           "FLOPs ratio", "prefill ms", "speedup", "limit", "peak mem", "KV/sample")
# what an 80-column terminal shows: quality next to cost; the files keep every column (the FLOPs
# ratio there: the FLOPs limit is its inverse on the timed batch)
COMPACT = {"press": "press", "keep": "keep", "avg/img": "avg\ntok", "accuracy": "accuracy", "agreement": "agreement",
           "KL": "KL", "speedup": "speedup", "limit": "FLOPs\nlimit"}
_LEFT = {"press"}


def quality_key(record: dict) -> str:
    """``"accuracy"`` when the data is labelled, else ``"agreement"``."""
    return record.get("quality_metric") or ("accuracy" if record.get("labelled") else "agreement")


def best_per_budget(record: dict) -> dict[int, str]:
    """The winning press at each budget ``keep`` that two or more presses ran at: highest
    quality, ties broken by agreement with the unpressed model, then by lower KL."""
    key = quality_key(record)
    by_keep = defaultdict(list)
    for row in record["rows"]:
        if row["keep"] is not None and row[key] is not None:
            by_keep[row["keep"]].append(row)
    return {keep: max(rows, key=lambda r: (r[key], r["agreement"], -r["kl"]))["press"]
            for keep, rows in sorted(by_keep.items(), reverse=True) if len(rows) > 1}


def paired_comparisons(record: dict) -> dict[int, list[str]]:
    """Compare each press with its budget's winner and with the unpressed model, on the same
    questions: the quality difference and its paired bootstrap interval (the same resampled
    questions for both; needs the rows' per-question ``correct`` or ``agree`` lists), ``tied`` when
    the interval holds 0. Sets ``record["vs_best"]`` and ``record["vs_unpressed"]`` (budget as a
    string -> press -> comparison; the rows stay as measured) and ``record["tied_with_best"]``
    (budget -> the presses not told apart from the winner, the winner first), and returns the latter."""
    from mmpress.eval.metrics import paired_bootstrap_ci

    key = quality_key(record)
    marks = "correct" if key == "accuracy" else "agree"
    seed = (record.get("ci") or {}).get("seed", 0)
    best = best_per_budget(record)
    rows = {(r["press"], r["keep"]): r for r in record["rows"]}
    base = rows.get(("none", None))

    def versus(row: dict, other: dict | None) -> dict | None:
        if other is None or row.get(marks) is None or other.get(marks) is None:
            return None
        ci = paired_bootstrap_ci(row[marks], other[marks], seed=seed)
        if ci is None:
            return None
        return {"press": other["press"], "diff": row[key] - other[key], "ci": [float(ci[0]), float(ci[1])],
                "tied": ci[0] <= 0 <= ci[1]}

    vs_best, vs_base, tied = defaultdict(dict), defaultdict(dict), defaultdict(list)
    for row in record["rows"]:
        if row["press"] == "none":
            continue
        budget = "own" if row["keep"] is None else str(row["keep"])
        if (to_base := versus(row, base)) is not None:
            vs_base[budget][row["press"]] = to_base
        winner = best.get(row["keep"]) if row["keep"] is not None else None
        if winner is not None and (to_best := versus(row, rows[(winner, row["keep"])])) is not None:
            vs_best[budget][row["press"]] = to_best
            if to_best["tied"]:
                tied[row["keep"]].append(row["press"])
    out = {keep: sorted(tied[keep], key=lambda p: (p != best[keep], -rows[(p, keep)][key], p)) for keep in best
           if tied[keep]}
    record["vs_best"], record["vs_unpressed"] = dict(vs_best), dict(vs_base)
    record["tied_with_best"] = {str(k): v for k, v in out.items()}
    return out


def ordered_rows(record: dict) -> list[dict]:
    """Baseline first, presses without a budget next, then budgets from largest to smallest."""
    return sorted(record["rows"],
                  key=lambda r: (r["press"] != "none", r["keep"] is not None, -(r["keep"] or 0), r["press"]))


# ---- formatting -------------------------------------------------------------------------------
def _si(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for scale, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.0f} B"


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def stage_mark(row: dict) -> str:
    """Where a row's press acts, after its budget: ``@L2`` (an in-LLM press, from decoder layer 2
    on: the first layer it cuts at), ``@KV`` (a KV-cache press), nothing before the LM."""
    stage = row.get("stage") or ""
    if "in_llm" in stage and row.get("layer_kept"):
        return f"@L{row['layer_kept'][0][0]}"
    return "@KV" if "kv" in stage.split("+") else ""


def keep_text(row: dict) -> str:
    """A row's budget and where it applies: ``64``, ``own`` (a press that sets its own), ``16@L2``."""
    return ("own" if row["keep"] is None else str(row["keep"])) + stage_mark(row)


def avg_tokens(row: dict) -> float | None:
    """Visual tokens per image averaged over the LM's layers (a record without it: the kept ones)."""
    return row.get("avg_tokens", row.get("kept_tokens"))


def with_ci(value: float | None, ci: list[float] | None, style: str = "interval") -> str:
    """``0.83 [0.75, 0.90]`` (``style="interval"``), ``0.83±0.08`` (``"pm"``: half the interval's
    width), or (``"bare"``) the bare value to 3 decimals where there is no interval (an older record)."""
    if value is None:
        return "n/a"
    if not ci or style == "bare":
        return f"{value:.3f}"
    low, high = ci
    if style == "pm":
        return f"{value:.2f}±{(high - low) / 2:.2f}"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _versus(comparison: dict | None, best: bool) -> str:
    if best:
        return "best"
    if not comparison:
        return ""
    low, high = comparison["ci"]
    return f"{comparison['diff']:+.2f} [{low:+.2f}, {high:+.2f}]" + ("" if comparison["tied"] else " *")


NOISY = "noisy"


def speedup_text(row: dict, style: str = "interval") -> str:
    """A measured speedup with its spread over the timing rounds: ``2.10x [2.02, 2.19]`` (min and
    max, ``style="interval"``) or ``2.10x±4%`` (``"pm"``: half the range, as a share of the
    median); a noisy one (``row["noisy"]``) is no result: ``noisy`` alone (``"pm"``), or
    ``noisy (3.37x [2.95, 3.60])``. A row without rounds (an older record): the bare speedup."""
    speedup, spread = row.get("speedup"), row.get("speedup_range")
    if speedup is None:
        return "n/a"
    if not spread:
        return f"{speedup:.2f}x"
    low, high = spread
    if row.get("noisy"):
        return NOISY if style == "pm" else f"{NOISY} ({speedup:.2f}x [{low:.2f}, {high:.2f}])"
    if style == "pm":  # 3 digits: an 80-column terminal holds "10.2x±3%"
        return f"{speedup:.{2 if speedup < 10 else 1}f}x" + (f"±{(high - low) / 2 / speedup:.0%}" if high > low else "")
    return f"{speedup:.2f}x [{low:.2f}, {high:.2f}]"


def _noisy_text(rounds=None) -> str:
    over = f"its {rounds} timing rounds" if rounds else "its timing rounds"
    return (f"{NOISY}: not a result: {over} spread over 10% of its median, or it beat its FLOPs limit by more than "
            "that spread (a press cannot run faster than the work it leaves: the unpressed rounds were slowed by "
            "other work); rerun with more --rounds on a quieter machine")


def machine_text(machine: dict | None) -> str:
    """How busy the machine was while timing: ``2 CPUs, 2 torch threads, load average 9.08 before,
    8.70 after (1 min): busy``."""
    if not machine:
        return "machine load not recorded"

    def load(key):
        value = machine.get(key)
        return "n/a" if not value else f"{value[0]:.2f}"
    cpus = machine.get("cpus")
    usable = machine.get("usable_cpus")
    text = f"{cpus} CPUs" + (f" ({usable} usable)" if usable and usable != cpus else "")
    processes = machine.get("processes") or 1
    if processes > 1:
        threads = machine.get("threads_per_process") or [machine.get("threads")] * processes
        text += f", {processes} processes of {'/'.join(map(str, threads))} torch threads"
    else:
        text += f", {machine.get('threads')} torch threads"
    text += f", load average {load('load_before')} before, {load('load_after')} after (1 min)"
    if machine.get("busy"):
        text += ": busy, more runnable work than CPUs"
    return text


def table_cells(record: dict, ci: str = "interval") -> list[tuple[list[str], bool]]:
    """One list of formatted cells per row (in :func:`ordered_rows` order), with whether the row
    is its budget's winner; ``ci``: how accuracy and agreement show their intervals
    (:func:`with_ci`)."""
    best, key = best_per_budget(record), quality_key(record)
    # 80 columns hold one "value±half-width": the quality metric's; the other shows its value alone
    styles = {name: ci if ci != "pm" or name == key else "bare" for name in ("accuracy", "agreement")}
    out = []
    for r in ordered_rows(record):
        flops = r["flops"]
        winner = r["keep"] is not None and best.get(r["keep"]) == r["press"]
        cells = [
            r["press"] + (" (unpressed)" if r["press"] == "none" else ""),
            "all" if r["press"] == "none" else keep_text(r),
            f"{r['kept_tokens']:.4g}",
            _num(avg_tokens(r), ".0f"),
            with_ci(r["accuracy"], r.get("accuracy_ci"), styles["accuracy"]),
            # the unpressed model agrees with itself by definition: no interval to show
            ("1.000" if styles["agreement"] == "bare" else "1.00") if r["press"] == "none" and r.get("agreement_ci") else
            with_ci(r["agreement"], r.get("agreement_ci"), styles["agreement"]),
            _versus((record.get("vs_best") or {}).get(str(r["keep"]), {}).get(r["press"]), winner),
            _num(r["kl"], ".4f"),
            _si(flops and flops["total"], "FLOP"),
            _num(r["flops_ratio"], ".3f"),
            _num(r["prefill_s"] * 1e3, ".1f"),
            speedup_text(r, "pm" if ci == "pm" else "interval"),
            "n/a" if r["speedup_limit"] is None else f"{r['speedup_limit']:.2f}x",
            _bytes(r["peak_memory_bytes"]),
            _bytes(r["kv_bytes"]),
        ]
        out.append((cells, winner))
    return out


def _title(record: dict) -> str:
    model = record["model"]
    return (f"{model['name']} · {record.get('dataset') or 'data'} · n={record['n']} questions · "
            f"{model['visual_tokens_per_image']} visual tokens/image")


def _has_ci(record: dict) -> bool:
    return any(r.get("accuracy_ci") or r.get("agreement_ci") for r in record["rows"])


def _ci_text(record: dict) -> str:
    ci = record.get("ci") or {}
    level, resamples = ci.get("level", 0.95), ci.get("resamples", 1000)
    return (f"[a, b]: {level:.0%} percentile bootstrap interval over the n={record['n']} questions "
            f"({resamples} resamples, seed {ci.get('seed', 0)})")


_STAGES_TEXT = "keep@Lk: an in-LLM press, from decoder layer k on; keep@KV: a KV-cache press."


def _caption(record: dict, compact: bool = False) -> str:
    settings = record["settings"]
    rounds = settings.get("rounds", settings.get("repeats"))
    timed = (f"median of {rounds} round-robin rounds on a batch of {settings['timing_batch']} "
             f"({settings['device']})")
    noisy = any(r.get("noisy") for r in record["rows"])
    if compact:
        pm = (f"±: half the {(record.get('ci') or {}).get('level', 0.95):.0%} bootstrap interval of "
              f"{quality_key(record)}. " if _has_ci(record) else "")
        return (f"bold: best press per budget by {quality_key(record)}. {pm}{_STAGES_TEXT} avg tok: visual tokens "
                f"per image averaged over the LM's layers. KL: first answer token vs unpressed, nats. Speedup: "
                f"measured prefill, {timed}, ±: half its range over the rounds; FLOPs limit: the speedup FLOPs "
                f"allow. {_noisy_text(rounds) + '. ' if noisy else ''}Time, memory, KV cache: in the report.")
    memory = settings["peak_memory"] or "n/a (not measurable on this device)"
    ci = ""
    if _has_ci(record):
        ci = (f"{_ci_text(record)}. vs best: {quality_key(record)} minus the budget's best, paired bootstrap "
              "interval (the same resampled questions for both); * = the interval excludes 0, a real difference "
              "at this n. ")
    return (f"bold: best press per budget by {quality_key(record)} (ties: agreement, then KL). {ci}"
            f"{_STAGES_TEXT} kept/img: visual tokens per image after the last stage; avg/img: averaged over the "
            "LM's layers (what its cost follows). KL: first answer token, KL(unpressed || pressed), nats (a KV "
            "press's prefill is unpressed: KL 0). FLOPs: analytical prefill, per sample, each LM layer at its own "
            f"length. Prefill: {timed}; speedup [min, max] over the rounds; limit = FLOPs ratio of that batch. "
            f"{_noisy_text(rounds) + '. ' if noisy else ''}Peak memory: {memory}. KV: the prompt's cache after the "
            f"prefill, per sample. Machine: {machine_text(record.get('machine'))}.")


# ---- terminal ---------------------------------------------------------------------------------
def bench_table(record: dict, compact: bool = False) -> Table:
    """The record as a rich table, winners in bold; ``compact``: only the columns of
    :data:`COMPACT` (quality and cost side by side in 80 columns)."""
    headers = {h: COMPACT[h] for h in HEADERS if h in COMPACT} if compact else {h: h for h in HEADERS}
    # the caption as plain text: its "[a, b]" is no rich markup
    table = Table(title=_title(record), caption=Text(_caption(record, compact)), caption_justify="left",
                  pad_edge=not compact)  # compact: two more columns for the cells
    for header, shown in headers.items():
        # fold, never "…": a cut number reads as another number
        table.add_column(shown, justify="left" if header in _LEFT else "right", overflow="fold")
    for cells, best in table_cells(record, ci="pm" if compact else "interval"):
        if compact:
            cells = [c.removesuffix(" (unpressed)") for c, h in zip(cells, HEADERS) if h in headers]
        cells = [Text(c, style="dim") if c.startswith(NOISY) else c for c in cells]  # no result: dimmed
        table.add_row(*cells, style="bold" if best else None)
    return table


def print_table(record: dict, console: Console | None = None) -> None:
    """The record as a rich table, every column if the terminal is wide enough, else the compact
    one (:data:`COMPACT`); notes below."""
    console = console or Console()
    table = bench_table(record)
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum  # unclamped
    if natural > console.width:
        table = bench_table(record, compact=True)
    console.print(table)
    if record.get("machine"):
        console.print(f"machine: {machine_text(record['machine'])}", style="dim", highlight=False)
    for note in record.get("notes", []):
        console.print(f"[dim]note: {note}[/dim]")


def prefill_table(rows: list[dict], title: str) -> Table:
    """``mmpress bench-cost``'s rows (:func:`mmpress.eval.prefill.bench_prefill`) as a rich table
    that fits 80 columns."""
    noisy = f" {_noisy_text()}." if any(r.get("noisy") for r in rows) else ""
    table = Table(title=title, caption=f"{_STAGES_TEXT} avg tok: visual tokens per image averaged over the LM's "
                  "layers. speedup: the median over the round-robin timing rounds, ±: half its range over them. "
                  "FLOPs limit: each LM layer at its own length. speedup / limit: the share of the FLOPs "
                  "limit reached; press overhead: time inside the press (in-LLM / KV presses: their selection, not "
                  f"the attention they read), as a share of the unpressed prefill.{noisy}", caption_justify="left",
                  pad_edge=False)
    for header in ("press", "keep", "avg\ntok", "prefill\nms", "speedup", "FLOPs\nlimit", "speedup\n/ limit",
                   "press\noverhead"):
        table.add_column(header, justify="left" if header == "press" else "right", overflow="fold")
    for r in rows:
        speedup = speedup_text(r, "pm")
        noisy = speedup == NOISY
        table.add_row(r["press"], keep_text(r), _num(avg_tokens(r), ".0f"),
                      f"{r['seconds'] * 1e3:.1f}", Text(speedup, style="dim") if noisy else speedup,
                      f"{r['limit']:.2f}x", Text("-", style="dim") if noisy else f"{r['efficiency']:.0%}",
                      f"{r['overhead']:.1%}")
    return table


def decode_table(rows: list[dict], title: str) -> Table:
    """``mmpress bench-cost``'s KV cache and decode columns (rows timed with ``decode_steps``) as a
    rich table that fits 80 columns."""
    table = Table(title=title, caption="KV cache: the prompt's keys and values after the prefill, all rows, every "
                  "layer at its own length. Decode: greedy steps after the prefill (the first token excluded), "
                  "tokens/s over all rows, timed in the same rounds as the prefill; speedup over the unpressed model.",
                  caption_justify="left", pad_edge=False)
    for header in ("press", "keep", "KV cache", "KV\nratio", "decode\nms/step", "decode\ntok/s", "decode\nspeedup"):
        table.add_column(header, justify="left" if header == "press" else "right", overflow="fold")
    for r in rows:
        table.add_row(r["press"], keep_text(r), _bytes(r["kv_bytes"]), f"{r['kv_ratio']:.2f}",
                      f"{r['decode_s'] * 1e3:.2f}", f"{r['decode_tok_s']:.1f}", f"{r['decode_speedup']:.2f}x")
    return table


# ---- plot -------------------------------------------------------------------------------------
def plot_pareto(record: dict, path: str | Path) -> Path:
    """Two panels, quality vs visual tokens per image (averaged over the LM's layers: for a press
    before the LM, the kept ones) and vs measured prefill speedup; one
    line per press, the unpressed model as a horizontal line. Writes a PNG, returns its path."""
    # the Agg canvas directly, not pyplot: no global backend switch, safe in any process
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key = quality_key(record)
    rows = [r for r in record["rows"] if r["press"] != "none"]
    base = next(r for r in record["rows"] if r["press"] == "none")
    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_tokens, ax_speed = fig.subplots(1, 2, sharey=True)
    by_press = defaultdict(list)
    for r in rows:
        by_press[r["press"]].append(r)

    def bars(points: list[dict]):
        """Error bars (below, above) of the points' quality: their bootstrap interval, if any."""
        cis = [r.get(f"{key}_ci") for r in points]
        if not all(cis):
            return None
        return [[r[key] - ci[0] for r, ci in zip(points, cis)], [ci[1] - r[key] for r, ci in zip(points, cis)]]

    names = sorted(by_press)
    colors = ([matplotlib.colormaps["tab20"](i % 20) for i in range(len(names))] if len(names) > 10
              else [None] * len(names))  # more presses than the default cycle's 10 colours
    for i, name in enumerate(names):
        points = sorted(by_press[name], key=avg_tokens)
        # presses at one budget share an x: spread them a little (log axis) so the error bars stay apart
        spread = 0.3 if len(names) <= 4 else 0.8  # octaves shared by the presses at one budget
        dodge = 2 ** (spread * (i / max(1, len(names) - 1) - 0.5)) if len(names) > 1 else 1.0
        ys, err = [r[key] for r in points], bars(points)
        line = ax_tokens.errorbar([avg_tokens(r) * dodge for r in points], ys, yerr=err, fmt="o-", capsize=2,
                                  elinewidth=1, linewidth=0.8, markersize=4, label=name, color=colors[i])
        color = line.lines[0].get_color()
        ranges = [r.get("speedup_range") for r in points]  # the spread over the timing rounds
        xerr = ([[r["speedup"] - lo for r, (lo, _) in zip(points, ranges)],
                 [hi - r["speedup"] for r, (_, hi) in zip(points, ranges)]] if all(ranges) else None)
        ax_speed.errorbar([r["speedup"] for r in points], ys, xerr=xerr, yerr=err, fmt="o-", capsize=2, elinewidth=1,
                          linewidth=0.8, markersize=4, color=color)
        noisy = [r for r in points if r.get("noisy")]
        if noisy:  # not results: ringed in grey
            ax_speed.scatter([r["speedup"] for r in noisy], [r[key] for r in noisy], s=120, facecolors="none",
                             edgecolors="grey", linewidths=1.2, zorder=3)
        if len(names) <= 8:
            for r in points:
                ax_speed.annotate(str(r["keep"] or "own"), (r["speedup"], r[key]), textcoords="offset points",
                                  xytext=(4, 4), fontsize=7, color=color)
    if len(names) > 8:  # a label per point would pile up: one per budget, above its highest point
        for keep in {r["keep"] for r in rows}:
            top = max((r for r in rows if r["keep"] == keep), key=lambda r: r[key])
            ax_speed.annotate(str(keep or "own"), (top["speedup"], top[key]), textcoords="offset points",
                              xytext=(4, 8), fontsize=8)
    base_ci = base.get(f"{key}_ci") if key == "accuracy" else None
    for ax in (ax_tokens, ax_speed):
        ax.axhline(base[key], color="black", linestyle="--", linewidth=1,
                   label=f"unpressed ({base['kept_tokens']:.0f} tokens)")
        if base_ci:
            ax.axhspan(*base_ci, color="black", alpha=0.07, linewidth=0)
        ax.grid(alpha=0.3)
    ax_speed.plot([1.0], [base[key]], "ks")
    values = [base[key], *(r[key] for r in rows)]
    values += [bound for r in record["rows"] for bound in (r.get(f"{key}_ci") or [])]
    pad = max(0.05, 0.05 * (max(values) - min(values)))  # a flat line (all equal) still gets a visible axis
    ax_tokens.set_ylim(max(0.0, min(values) - pad) if min(values) >= 0 else min(values) - pad,
                       min(1.0, max(values) + pad) if max(values) <= 1 else max(values) + pad)
    ax_tokens.set_xscale("log", base=2)
    ticks = sorted({round(avg_tokens(r)) for r in rows})
    ax_tokens.set_xticks(ticks, [str(t) for t in ticks])
    ax_tokens.minorticks_off()
    # an in-LLM press keeps every token in its first layers: placed by the tokens its layers see on average
    ax_tokens.set_xlabel("visual tokens per image (averaged over the LM's layers)")
    interval = _has_ci(record) and f"{(record.get('ci') or {}).get('level', 0.95):.0%} bootstrap interval"
    ax_tokens.set_ylabel(f"{key} (bars: {interval})" if interval else key)
    noisy = any(r.get("noisy") for r in rows)
    ax_speed.set_xlabel("measured prefill speedup (x, labels: budget; bars: range over the timing rounds"
                        + ("; ringed: noisy, not a result)" if noisy else ")"))
    if len(names) > 8:  # beside the panels: inside, it would hide points
        fig.legend(*ax_tokens.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    else:
        ax_tokens.legend(fontsize=8)
    fig.suptitle(_title(record), fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


# ---- files ------------------------------------------------------------------------------------
def to_markdown(record: dict, image: str | None = None) -> str:
    lines = [f"# mmpress bench: {_title(record)}", "", "| " + " | ".join(HEADERS) + " |",
             "|" + "|".join(":--" if h in _LEFT else "--:" for h in HEADERS) + "|"]
    for cells, best in table_cells(record):
        lines.append("| " + " | ".join(f"**{c}**" if best else c for c in cells) + " |")
    lines += ["", _caption(record)]
    best = best_per_budget(record)
    if best:
        lines += ["", "Best per budget: " + ", ".join(f"{k}: {p}" for k, p in best.items()) + "."]
    tied = record.get("tied_with_best") or {}
    if any(len(presses) > 1 for presses in tied.values()):
        lines += ["", "Not told apart from the best at this n (paired interval holds 0): " + "; ".join(
            f"{keep}: {', '.join(p for p in presses if p != best.get(float(keep)))}"
            for keep, presses in tied.items() if len(presses) > 1) + "."]
    noisy = [f"{r['press']} keep={keep_text(r)} ({r['noisy']})" for r in ordered_rows(record) if r.get("noisy")]
    if noisy:
        lines += ["", "Noisy speedups, not results: " + "; ".join(noisy) + "."]
    lines += [f"- note: {note}" for note in record.get("notes", [])]
    if image:
        lines += ["", f"![quality vs cost]({image})"]
    return "\n".join(lines) + "\n"


def to_html(record: dict, png: bytes | None = None) -> str:
    """A self-contained page: the table (winners bold), notes, and the plot inlined as base64."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADERS)
    body = "".join(
        "<tr{}>{}</tr>".format(' class="best"' if best else "", "".join(f"<td>{esc(c)}</td>" for c in cells))
        for cells, best in table_cells(record)
    )
    notes = "".join(f"<li>{esc(n)}</li>" for n in record.get("notes", []))
    img = "" if png is None else f'<img alt="quality vs cost" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    model = record["model"]
    summary = (f"{model['class']} ({model['model_type']}, {model['dtype']}, {model['parameters']:,} parameters) · "
               "settings: " + ", ".join(f"{k}={v}" for k, v in record["settings"].items() if k != "peak_memory"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mmpress bench</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
tr.best td {{ font-weight: bold; background: #eef6ee; }}
.meta {{ color: #666; font-size: 13px; max-width: 70em; }}
img {{ max-width: 100%; margin-top: 1.5em; }}
</style></head><body>
<h1>mmpress bench</h1>
<p><b>{esc(_title(record))}</b></p>
<p class="meta">{esc(summary)}</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p class="meta">{esc(_caption(record))}</p>
{f"<ul class='meta'>{notes}</ul>" if notes else ""}
{img}
</body></html>
"""


def save_json(record: dict, path: str | Path) -> Path:
    """Write ``record`` as JSON atomically (a temporary file, then ``os.replace``): an interrupt
    leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return path


def write_report(record: dict, out: str | Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md``, ``bench.png`` and ``bench.html`` under ``out`` (created
    if missing); returns their paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"bench.{kind}" for kind in ("json", "md", "png", "html")}
    save_json(record, paths["json"])
    plot_pareto(record, paths["png"])
    paths["md"].write_text(to_markdown(record, image=paths["png"].name))
    paths["html"].write_text(to_html(record, paths["png"].read_bytes()))
    return paths


__all__ = ["avg_tokens", "bench_table", "best_per_budget", "decode_table", "keep_text", "machine_text",
           "ordered_rows", "paired_comparisons", "plot_pareto", "prefill_table", "print_table", "quality_key",
           "save_json", "speedup_text", "stage_mark", "table_cells", "to_html", "to_markdown", "with_ci",
           "write_report"]
