"""Reports of a bench record (:func:`mmpress.eval.bench.run_bench`): terminal table, JSON, markdown,
a Pareto plot (quality vs kept tokens and vs measured prefill speedup) and a self-contained HTML page.

Every view bolds the best press at each budget, by the record's quality metric (accuracy on
labelled data, else agreement with the unpressed model), ties broken by agreement, then by the
lower first-token KL.
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

HEADERS = ("press", "keep", "kept/img", "accuracy", "agreement", "KL", "FLOPs/sample", "FLOPs ratio",
           "prefill ms", "speedup", "limit", "peak mem", "KV/sample")
# what an 80-column terminal shows: quality next to cost; the files keep every column
COMPACT = {"press": "press", "keep": "keep", "accuracy": "accuracy", "agreement": "agreement", "KL": "KL",
           "FLOPs ratio": "FLOPs\nratio", "speedup": "speedup", "limit": "FLOPs\nlimit"}
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


def table_cells(record: dict) -> list[tuple[list[str], bool]]:
    """One list of formatted cells per row (in :func:`ordered_rows` order), with whether the row
    is its budget's winner."""
    best = best_per_budget(record)
    out = []
    for r in ordered_rows(record):
        flops = r["flops"]
        cells = [
            r["press"] + (" (unpressed)" if r["press"] == "none" else ""),
            "all" if r["press"] == "none" else "own" if r["keep"] is None else str(r["keep"]),
            f"{r['kept_tokens']:.4g}",
            _num(r["accuracy"], ".3f"),
            _num(r["agreement"], ".3f"),
            _num(r["kl"], ".4f"),
            _si(flops and flops["total"], "FLOP"),
            _num(r["flops_ratio"], ".3f"),
            _num(r["prefill_s"] * 1e3, ".1f"),
            _num(r["speedup"], ".2f") + "x",
            "n/a" if r["speedup_limit"] is None else f"{r['speedup_limit']:.2f}x",
            _bytes(r["peak_memory_bytes"]),
            _bytes(r["kv_bytes"]),
        ]
        out.append((cells, r["keep"] is not None and best.get(r["keep"]) == r["press"]))
    return out


def _title(record: dict) -> str:
    model = record["model"]
    return (f"{model['name']} · {record.get('dataset') or 'data'} · n={record['n']} · "
            f"{model['visual_tokens_per_image']} visual tokens/image")


def _caption(record: dict, compact: bool = False) -> str:
    settings = record["settings"]
    timed = (f"median of {settings['repeats']} forwards on a batch of {settings['timing_batch']} "
             f"({settings['device']})")
    if compact:
        return (f"bold: best press per budget by {quality_key(record)}. KL: first answer token vs unpressed, "
                f"nats. FLOPs ratio: pressed / unpressed prefill. Speedup: measured prefill, {timed}; FLOPs "
                "limit: the speedup FLOPs allow. Time, memory, KV cache: in the report.")
    memory = settings["peak_memory"] or "n/a (not measurable on this device)"
    return (f"bold: best press per budget by {quality_key(record)} (ties: agreement, then KL). "
            f"KL: first answer token, KL(unpressed || pressed), nats. FLOPs: analytical prefill, per sample. "
            f"Prefill: {timed}; limit = FLOPs ratio of that batch. Peak memory: {memory}.")


# ---- terminal ---------------------------------------------------------------------------------
def bench_table(record: dict, compact: bool = False) -> Table:
    """The record as a rich table, winners in bold; ``compact``: only the columns of
    :data:`COMPACT` (quality and cost side by side in 80 columns)."""
    headers = {h: COMPACT[h] for h in HEADERS if h in COMPACT} if compact else {h: h for h in HEADERS}
    table = Table(title=_title(record), caption=_caption(record, compact), caption_justify="left")
    for header, shown in headers.items():
        # fold, never "…": a cut number reads as another number
        table.add_column(shown, justify="left" if header in _LEFT else "right", overflow="fold")
    for cells, best in table_cells(record):
        if compact:
            cells = [c.removesuffix(" (unpressed)") for c, h in zip(cells, HEADERS) if h in headers]
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
    for note in record.get("notes", []):
        console.print(f"[dim]note: {note}[/dim]")


def prefill_table(rows: list[dict], title: str) -> Table:
    """``mmpress bench-cost``'s rows (:func:`mmpress.eval.prefill.bench_prefill`) as a rich table
    that fits 80 columns."""
    table = Table(title=title, caption="speedup / limit: the share of the FLOPs limit reached; press overhead: "
                  "time inside the press, as a share of the unpressed prefill.", caption_justify="left")
    for header in ("press", "keep", "prefill\nms", "speedup", "FLOPs\nlimit", "speedup\n/ limit", "press\noverhead"):
        table.add_column(header, justify="left" if header == "press" else "right", overflow="fold")
    for r in rows:
        table.add_row(r["press"], str(r["keep"]), f"{r['seconds'] * 1e3:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['limit']:.2f}x", f"{r['efficiency']:.0%}", f"{r['overhead']:.1%}")
    return table


# ---- plot -------------------------------------------------------------------------------------
def plot_pareto(record: dict, path: str | Path) -> Path:
    """Two panels, quality vs kept visual tokens per image and vs measured prefill speedup; one
    line per press, the unpressed model as a horizontal line. Writes a PNG, returns its path."""
    # the Agg canvas directly, not pyplot: no global backend switch, safe in any process
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key = quality_key(record)
    rows = [r for r in record["rows"] if r["press"] != "none"]
    base = next(r for r in record["rows"] if r["press"] == "none")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_tokens, ax_speed = fig.subplots(1, 2, sharey=True)
    by_press = defaultdict(list)
    for r in rows:
        by_press[r["press"]].append(r)
    for name, points in sorted(by_press.items()):
        points.sort(key=lambda r: r["kept_tokens"])
        (line,) = ax_tokens.plot([r["kept_tokens"] for r in points], [r[key] for r in points], "o-", label=name)
        ax_speed.plot([r["speedup"] for r in points], [r[key] for r in points], "o-", color=line.get_color())
        for r in points:
            ax_speed.annotate(str(r["keep"] or "own"), (r["speedup"], r[key]), textcoords="offset points",
                              xytext=(4, 4), fontsize=7, color=line.get_color())
    for ax in (ax_tokens, ax_speed):
        ax.axhline(base[key], color="black", linestyle="--", linewidth=1,
                   label=f"unpressed ({base['kept_tokens']:.0f} tokens)")
        ax.grid(alpha=0.3)
    ax_speed.plot([1.0], [base[key]], "ks")
    values = [base[key], *(r[key] for r in rows)]
    pad = max(0.05, 0.1 * (max(values) - min(values)))  # a flat line (all equal) still gets a visible axis
    ax_tokens.set_ylim(min(values) - pad, max(values) + pad)
    ax_tokens.set_xscale("log", base=2)
    ticks = sorted({round(r["kept_tokens"]) for r in rows})
    ax_tokens.set_xticks(ticks, [str(t) for t in ticks])
    ax_tokens.minorticks_off()
    ax_tokens.set_xlabel("visual tokens kept per image")
    ax_tokens.set_ylabel(key)
    ax_speed.set_xlabel("measured prefill speedup (x, labels: budget)")
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


__all__ = ["bench_table", "best_per_budget", "ordered_rows", "plot_pareto", "prefill_table", "print_table",
           "quality_key", "save_json", "table_cells", "to_html", "to_markdown", "write_report"]
