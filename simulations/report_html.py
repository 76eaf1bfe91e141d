"""report.html: the run report as one self-contained page, to send as an email attachment.

It holds what report.md holds, built by the same functions (simulations/report.py), with
the plots embedded as base64 PNG data URIs and the style inline: the page makes no
request and runs no script, so it opens the same from a mail client, a file share or a
browser without network. Every value is HTML-escaped: site names come from the data.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from html import escape
from pathlib import Path

from fedmodel.run_directory import REPORT_FILE, REPORT_HTML_FILE, RunSummary
from simulations import report

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1f2328; background: #fff; margin: 0; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 1.6em; margin: 0 0 8px; }
h2 { font-size: 1.2em; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
p { margin: 8px 0; }
.headline { font-size: 1.1em; background: #f6f8fa; border-left: 4px solid #0969da;
            padding: 8px 12px; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; }
th:first-child, td:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fafbfc; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 16px; }
figure { margin: 0; }
figure img { width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #59636e; font-size: 0.9em; }
"""


def write_html_report(run_dir: Path, summary: RunSummary) -> Path:
    """Write report.html beside report.md (written first: its plots are the ones embedded)."""
    body = [
        f"<h1>{escape(report.report_title(summary))}</h1>",
        _paragraph(report.run_description(summary)),
        _headline(summary),
        *map(_paragraph, report.federation_sentences(summary)),
    ]
    if summary.baselines:
        body += [
            "<h2>Baselines</h2>",
            _paragraph(report.baseline_note(summary)),
            _table(report.baseline_columns(summary.scoring), report.baseline_rows(summary)),
            _paragraph(report.baseline_verdict(summary)),
        ]
    if summary.heterogeneity:
        body += ["<h2>Heterogeneity</h2>", _paragraph(report.heterogeneity_note(summary))]
    body += [
        "<h2>Rounds</h2>",
        _table(report.round_columns(summary.scoring), report.round_rows(summary)),
        "<h2>Privacy spent per client</h2>",
        _paragraph(report.PRIVACY_NOTE),
    ]
    if (partial := report.partial_table_note(summary)) is not None:
        body.append(_paragraph(partial))
    body.append(_table(report.PRIVACY_COLUMNS, report.privacy_rows(summary)))
    if summary.client_level_dp:
        body += [
            f"<h2>{report.CLIENT_LEVEL_HEADING}</h2>",
            _paragraph(report.client_level_note(summary)),
            _table(report.CLIENT_LEVEL_COLUMNS, report.client_level_rows(summary)),
        ]
    figures = "\n".join(_figure(run_dir / name) for name in _plots(run_dir))
    body += ["<h2>Plots</h2>", f'<div class="plots">\n{figures}\n</div>']
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(report.report_title(summary))}</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )
    path = run_dir / REPORT_HTML_FILE
    path.write_text(page, encoding="utf-8")
    return path


def _plots(run_dir: Path) -> list[str]:
    """The plots report.md shows, in its order: the two reports never disagree on them."""
    return re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", (run_dir / REPORT_FILE).read_text(), re.M)


def _headline(summary: RunSummary) -> str:
    headline, *others = summary.scoring.described(summary.final_metrics)
    rest = "".join(f", {escape(score)}" for score in others)
    title = f"Final {summary.scored_on} {headline}"
    return f'<p class="headline"><strong>{escape(title)}</strong>{rest}.</p>'


def _paragraph(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def _table(columns: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = "".join(f"<th>{escape(column)}</th>" for column in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _figure(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    name = escape(png.name)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{name}">'
        f"<figcaption>{name}</figcaption></figure>"
    )
