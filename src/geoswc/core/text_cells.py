"""Text cells of the files geoswc writes for people: CSV cells a spreadsheet opens safely, Markdown table cells that
never break their row. Standard library only (cheap to import)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
"""What a spreadsheet may take for the start of a formula in a cell: OWASP's list for CSV injection (``=``, ``+``,
``-``, ``@``, tab, carriage return) and the full-width forms of the first four."""


def csv_text(value: str) -> str:
    """A text cell of a CSV written for people, safe to open in a spreadsheet: a value that begins with one of
    :data:`FORMULA_STARTS` gets a single quote ``'`` added in front (OWASP's advice: the spreadsheet shows it as
    text, never runs it). So that :func:`csv_plain` can give every value back, a value that begins with ``'``
    gets one too. Only text columns go through it, never numbers (``-12.5`` stays a number)."""
    return "'" + value if value.startswith((*FORMULA_STARTS, "'")) else value


def csv_plain(cell: str) -> str:
    """A text cell of a CSV geoswc wrote, as the value :func:`csv_text` was given (its added quote removed)."""
    return cell[1:] if cell.startswith("'") else cell


def csv_row(cells: Sequence[Any]) -> str:
    """One CSV record, ending in ``\\n``, whose fields holding a line break of either kind (``\\r`` as well as
    ``\\n``) are quoted: a writer whose records end in ``\\n`` alone leaves a lone ``\\r`` bare, and a reader then
    splits the record there."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(cells)
    return buf.getvalue()[:-2] + "\n"


MARKDOWN_BREAKS = ("\r\n", "\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
"""Line breaks (as :meth:`str.splitlines` counts them) that :func:`markdown_cell` writes as ``<br>``."""


def markdown_cell(text: str) -> str:
    """``text`` as one cell of a Markdown table row, shown as given: ``&``, ``<`` and ``>`` as entities (no
    HTML), ``\\`` and ``|`` escaped with a backslash (a ``|`` would end the cell), each line break as ``<br>`` (one
    would end the row), and leading or trailing white space as character references (a table trims it)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    for brk in MARKDOWN_BREAKS:
        text = text.replace(brk, "<br>")
    body = text.lstrip()
    lead = text[: len(text) - len(body)]
    body = body.rstrip()
    trail = text[len(lead) + len(body) :]
    return "".join(f"&#{ord(c)};" for c in lead) + body + "".join(f"&#{ord(c)};" for c in trail)


# -- artifact folders replaced whole ------------------------------------------------------------------------------
