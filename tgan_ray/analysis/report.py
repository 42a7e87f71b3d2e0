"""One self-contained HTML report per run, plus the particle table (CSV and Parquet).

The report embeds every figure as a base64 data URI and carries its own CSS, so it opens offline, can be
mailed as one file and logged to MLflow as one artifact. Nothing in it points to the network.

    write_report(run_dir, "Pt/C HAADF, batch 3", summary, {"Size distribution": psd_png}, {"Per image": df})
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import html
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #1d232b;
       background: #f5f6f8; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
h2 { font-size: 1.2rem; margin: 32px 0 12px; border-bottom: 1px solid #d5d9e0; padding-bottom: 4px; }
.meta { color: #5b6572; font-size: .9rem; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
.card { background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 10px 14px; }
.card .label { color: #5b6572; font-size: .8rem; text-transform: uppercase; letter-spacing: .03em; }
.card .value { font-size: 1.35rem; font-weight: 600; }
.card .note { color: #5b6572; font-size: .8rem; }
figure { background: #fff; border: 1px solid #dde1e7; border-radius: 8px; margin: 0 0 16px; padding: 12px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { color: #3a434e; font-size: .9rem; margin-top: 6px; text-align: center; }
table { border-collapse: collapse; background: #fff; font-size: .88rem; margin-bottom: 16px; }
th, td { border: 1px solid #dde1e7; padding: 4px 10px; text-align: right; }
th { background: #eef0f4; }
td:first-child, th:first-child { text-align: left; }
.scroll { max-height: 420px; overflow: auto; display: inline-block; max-width: 100%; }
"""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step.

    Readers never see a half-written file, and a failed write leaves the old file in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per call, so concurrent writers never share a temporary; the writer creates the file,
    # which gives it the usual umask permissions (mkstemp's would be owner-only).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_particles_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the particle table as CSV (no index), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def write_particles_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the particle table as Parquet (typed columns, no index), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _card(label: str, value: str, note: str = "") -> str:
    note_html = f'<div class="note">{html.escape(note)}</div>' if note else ""
    return (
        f'<div class="card"><div class="label">{html.escape(label)}</div>'
        f'<div class="value">{html.escape(value)}</div>{note_html}</div>'
    )


def _interval(summary: Mapping[str, Any], key: str) -> str:
    """'95% CI 9.8–10.4' from the summary's bootstrap intervals, or '' when there are none."""
    intervals = summary.get("intervals")
    ci = intervals.get(key) if isinstance(intervals, Mapping) else None
    if not isinstance(ci, Mapping):
        return ""
    return f"{100 * intervals.get('level', 0.95):.0f}% CI {_fmt(ci.get('low'))}–{_fmt(ci.get('high'))}"


def _summary_cards(summary: Mapping[str, Any]) -> str:
    unit = summary.get("unit") or "px"
    cards = []
    if "count" in summary:
        cards.append(_card("Particles measured", _fmt(summary.get("count")), "interior, used for sizes"))
    if "border_count" in summary:
        cards.append(_card("At frame edge", _fmt(summary.get("border_count")), "excluded from sizes"))
    if summary.get("mean") is not None:
        sd = f" ± {_fmt(summary.get('sd'))}" if summary.get("sd") is not None else ""
        note = "; ".join(filter(None, ["equivalent-circle, ± 1 sd", _interval(summary, "mean")]))
        cards.append(_card("Mean diameter", f"{_fmt(summary['mean'])}{sd} {unit}", note))
    if summary.get("median") is not None:
        cards.append(
            _card("Median diameter", f"{_fmt(summary['median'])} {unit}", _interval(summary, "median"))
        )
    if summary.get("d10") is not None:
        d = " / ".join(_fmt(summary.get(k)) for k in ("d10", "d50", "d90"))
        note = "; ".join(f"{k}: {_interval(summary, k)}" for k in ("d10", "d90") if _interval(summary, k))
        cards.append(_card("d10 / d50 / d90", f"{d} {unit}", note))
    if summary.get("dispersion") is not None:
        cards.append(_card("Dispersion (CV)", f"{100 * summary['dispersion']:.1f} %", "sd / mean"))
    fit = summary.get("lognormal")
    if isinstance(fit, Mapping):
        cards.append(
            _card(
                "Lognormal fit",
                f"{_fmt(fit.get('median'))} {unit}",
                f"median; σ = {_fmt(fit.get('sigma'))}, mean {_fmt(fit.get('mean'))} {unit}",
            )
        )
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def _key_value_table(items: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in items.items()
    )
    return f"<table><tbody>{rows}</tbody></table>" if rows else ""


def _figure(caption: str, path: Path) -> str:
    path = Path(path)
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"figure {caption!r}: {path} is not a PNG, JPEG or SVG file")
    if not path.is_file():
        raise FileNotFoundError(f"figure {caption!r}: file not found: {path}")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


_LENGTH_COLUMNS = ("equivalent_diameter", "major_axis", "minor_axis")


def _with_units(df: pd.DataFrame) -> pd.DataFrame:
    """Name the unit in the headings of a particle table (one unit per table, as psd_summary enforces)."""
    if "unit" not in df or df.empty or df["unit"].nunique() != 1:
        return df
    unit = str(df["unit"].iloc[0])
    names = {c: f"{c} ({unit})" for c in _LENGTH_COLUMNS if c in df}
    names.update({c: f"{c} (px)" for c in ("centroid_x", "centroid_y") if c in df})
    if "area" in df:
        names["area"] = f"area ({unit}²)"
    return df.drop(columns="unit").rename(columns=names)


def _table(caption: str, df: pd.DataFrame) -> str:
    df = _with_units(df)
    # escape=True keeps image names such as "<b>.tif" from turning into markup.
    body = df.to_html(index=False, escape=True, border=0, float_format=lambda v: _fmt(float(v)), na_rep="–")
    return f"<h3>{html.escape(caption)}</h3><div class='scroll'>{body}</div>"


def write_report(
    run_dir: str | os.PathLike,
    title: str,
    summary: Mapping[str, Any],
    figures: Mapping[str, str | os.PathLike],
    tables: Mapping[str, pd.DataFrame] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<run_dir>/report.html``: summary numbers, figures, tables and run details in one file.

    Args:
        run_dir: folder the report goes into (created if missing).
        title: heading, e.g. the sample or stack name.
        summary: PSD summary from :func:`~tgan_ray.analysis.psd.psd_summary` (other scalar keys are listed too).
        figures: caption -> PNG / JPEG / SVG file, shown in this order and embedded as data URIs.
        tables: caption -> table (per-image counts, stage metrics, ...).
        extra: run details shown as a key/value table (pixel size, config preset, scores, ...).

    Returns:
        Path of the report.
    """
    run_dir = Path(run_dir)
    unit = summary.get("unit") or "px"
    known = {"count", "border_count", "unit", "mean", "median", "sd", "dispersion", "d10", "d50", "d90"}
    other = {k: v for k, v in summary.items() if k not in known and not isinstance(v, Mapping | list)}
    shape = summary.get("shape") if isinstance(summary.get("shape"), Mapping) else {}
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f'<div class="meta">Generated {dt.datetime.now().strftime("%Y-%m-%d %H:%M")} · sizes in {unit}'
        + (" (no pixel size known: lengths in pixels)" if unit == "px" else "")
        + "</div>",
        "<h2>Particle size distribution</h2>",
        _summary_cards(summary),
    ]
    if shape:
        readable = {k.replace("_median", "").replace("_", " "): v for k, v in shape.items()}
        parts += ["<h3>Shape of interior particles (medians, no unit)</h3>", _key_value_table(readable)]
    if other:
        parts.append(_key_value_table(other))
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(caption, Path(path)) for caption, path in figures.items()]
    if summary.get("per_image"):
        per_image = pd.DataFrame(
            [
                {"image": k, "particles (interior)": v.get("count"), "at frame edge": v.get("border_count")}
                for k, v in summary["per_image"].items()
            ]
        )
        tables = {"Particles per image": per_image, **(tables or {})}
    if tables:
        parts.append("<h2>Tables</h2>")
        parts += [_table(caption, df) for caption, df in tables.items()]
    if extra:
        parts += ["<h2>Run details</h2>", _key_value_table(extra)]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(parts)}</main></body></html>\n"
    )
    out = run_dir / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
