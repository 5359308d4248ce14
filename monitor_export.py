"""CSV export of run history: runs and a spider's per-day totals as RFC 4180 text, streamed a page at a time.

The API's ``?format=csv`` on ``/runs`` and ``/runs/<spider>/summary`` sends these. Every field of a run is a
column (``compare`` flattened to ``compare_<figure>``), in a fixed order so the header comes first; cells a
spreadsheet would run as a formula are made text. It imports only the standard library and monitor_read.
"""

import csv
import io

from monitor_records import COMPARED, read_runs

# A run record's columns, in order (monitor_contract.run_record, RECORD_RUN_LUA's compare and baseline_runs).
RUN_COLUMNS = (
    "node", "spider", "host", "pid", "start_time", "end_time", "duration", "finish_reason", "version", "args_hash",
    "pages", "items", "requests", "errors", "retries", "status_1xx", "status_2xx", "status_3xx", "status_4xx",
    "status_5xx", "peak_rss", "pages_per_min", "items_per_min", "baseline_runs",
) + tuple(f"compare_{f}" for f in COMPARED + ("baseline_of",))
# The summary's CSV is its ``days`` table.
DAY_COLUMNS = ("day", "runs", "pages", "items", "errors")
# Runs read from Redis per page while streaming: memory stays flat whatever the export's size.
PAGE = 500
# A cell starting with one of these is a formula to a spreadsheet (OWASP's list): it is sent with a leading '.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe(value):
    """A cell: "" for None, text with a leading ' when a spreadsheet would read it as a formula; numbers as
    they are (a negative number is a number, not a formula)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return "'" + value if value.startswith(FORMULA_START) else value
    if isinstance(value, (dict, list, bool)):
        return safe(str(value))
    return value


def run_row(record):
    """A run record's cells in RUN_COLUMNS order."""
    compare = record.get("compare") if isinstance(record.get("compare"), dict) else {}
    return [safe(compare.get(c[8:]) if c.startswith("compare_") else record.get(c)) for c in RUN_COLUMNS]


def csv_text(columns, rows):
    """Yield the CSV text (UTF-8 bytes): a header, then one line per row, a chunk per PAGE rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180: CRLF, quotes doubled inside quoted cells
    writer.writerow(columns)
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
        if count % PAGE == 0:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode("utf-8")


def runs_rows(r, prefix, spider, limit, before, reason):
    """The rows of ``read_runs`` (same order and filters), ``limit`` of them at most, read PAGE at a time."""
    left = limit
    while left > 0:
        page, before = read_runs(r, prefix, spider, min(PAGE, left), before, reason)
        for record in page:
            yield run_row(record)
        left -= len(page)
        if before is None:
            return


def days_rows(summary):
    return ([safe(day.get(c)) for c in DAY_COLUMNS] for day in summary["days"])
