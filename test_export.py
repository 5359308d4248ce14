"""CSV export of run history (issue 21 §3): read back with Python's csv module it equals the JSON."""

import csv
import io

import monitor_contract
from monitor_export import RUN_COLUMNS
from testbed import make_app

P = "scrapy"
NASTY = ("=HYPERLINK(\"http://x\")", "+1", "-2+3", "@SUM(A1)", "a,b \"quoted\"\nnext line", "plain", "ünï")


def seed(client, spider, count, start=1_000_000, step=100):
    """``count`` finished runs of ``spider``, ``step`` seconds apart, with names, reasons and versions a spreadsheet
    would trip on."""
    with client.pipeline(transaction=False) as pipe:
        for i in range(count):
            begin = start + i * step
            snap = {"node": f"{NASTY[i % len(NASTY)]}{i}", "spider": spider, "host": "h", "pid": i,
                    "start_time": begin, "timestamp": begin + 60, "items": 10 + i % 7, "pages": 20,
                    "errors": i % 3, "finish_reason": "finished" if i % 5 else "=cancelled", "status": "closed",
                    "version": NASTY[i % 3], "args_hash": "abc"}
            monitor_contract.write_run(pipe, P, monitor_contract.run_record(snap), begin, 10_000)
        pipe.execute()


def as_cell(value):
    """What the CSV holds for a JSON value: text made safe, numbers as Python writes them, null empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
    return str(value)


def expected(record):
    compare = record.get("compare") or {}
    return {c: as_cell(compare.get(c[8:]) if c.startswith("compare_") else record.get(c)) for c in RUN_COLUMNS}


def json_runs(c, query, before=""):
    """Every run of the JSON route for ``query`` older than ``before``, following ``next``."""
    out = []
    while True:
        body = c.get(f"/runs?{query}&limit=500&before={before}").get_json()
        out += body["runs"]
        if not body["next"]:
            return out
        before = body["next"]


def read_csv(resp):
    assert resp.status_code == 200 and resp.mimetype == "text/csv" and resp.is_streamed
    assert 'filename="' in resp.headers["Content-Disposition"]
    text = resp.get_data().decode("utf-8")
    assert text.endswith("\r\n") and text.startswith(",".join(RUN_COLUMNS[:3]))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    assert tuple(reader.fieldnames) == tuple(RUN_COLUMNS) or reader.fieldnames[0] == "day"
    return list(reader)


def test_runs_csv_read_back_equals_the_json_across_pages_and_filters(redis_client, redis_url):
    seed(redis_client, "s", 1203)
    seed(redis_client, "t", 12, start=1_050_000)
    c = make_app(redis_url).test_client()
    for query, before in (("spider=s", ""), ("spider=t&reason==cancelled", ""), ("", ""), ("spider=s", "1060000")):
        rows = read_csv(c.get(f"/runs?{query}&format=csv&before={before}"))
        runs = json_runs(c, query, before)
        assert rows == [expected(r) for r in runs] and len(rows) > 1
    assert len(read_csv(c.get("/runs?spider=s&format=csv"))) == 1203
    assert len(read_csv(c.get("/runs?spider=s&format=csv&limit=7"))) == 7
    rows = read_csv(c.get("/runs?spider=t&format=csv"))
    assert {r["node"][:1] for r in rows} >= {"'", "p", "a"}  # formulas made text; others as they are
    assert rows[0]["compare_baseline_of"] in ("version", "args", "any")


def test_summary_csv_is_its_days_table(redis_client, redis_url):
    now = int(monitor_contract.redis_now(redis_client.time()))
    seed(redis_client, "s", 30, start=now - 5 * 86400, step=14000)
    c = make_app(redis_url).test_client()
    days = c.get("/runs/s/summary").get_json()["days"]
    resp = c.get("/runs/s/summary?format=csv")
    assert resp.status_code == 200 and resp.is_streamed
    rows = list(csv.DictReader(io.StringIO(resp.get_data().decode(), newline="")))
    assert rows == [{k: str(v) for k, v in day.items()} for day in days] and len(rows) >= 3


def test_a_format_other_than_json_or_csv_is_a_400(redis_client, redis_url):
    c = make_app(redis_url).test_client()
    for path in ("/runs?format=xml", "/runs/s/summary?format=CSV", "/runs?format="):
        resp = c.get(path)
        assert resp.status_code == 400 and resp.get_json()["error"] == "format must be json or csv"
    assert c.get("/runs?format=csv&limit=0").status_code == 400
    assert c.get("/runs?format=json").get_json() == {"runs": [], "next": None}
    assert c.get("/runs/nobody/summary?format=csv").status_code == 404
