"""Where alerts go: mail, webhook, Alertmanager, Apprise and the console, and the messages they carry.

Each channel has ``name``, ``describe()``, ``send(alerts, prefix, recipients=None)`` (returning the recipients
refused as ``{address: (code, reply)}``, raising when the whole message failed) and ``send_test(prefix)``.
"""

import hashlib
import html
import json
import logging
import smtplib
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from monitor_contract import as_text, status_key
from monitor_rules import RULE, iso
from monitor_settings import Outage, safe_url, scrub

logger = logging.getLogger(__name__)

# One SMTP or HTTP operation (connect, a command, a read) gives up after this many seconds...
SEND_TIMEOUT = 10
# ...and a whole send after this many: well inside the lock it runs under, so its holder records the outcome.
SEND_DEADLINE = 40
# Mail and the webhook's text list this many alerts at most (the webhook's `alerts` field has them all).
MAX_LINES = 100
# The subject names this many alerts of each kind, then says how many more.
SUBJECT_NAMES = 5


# ---------------------------------------------------------------------------- messages

def subject(alerts, prefix):
    """``[scrapy] FIRING 2: cpu on a, down on b; RESOLVED 1: memory on c``: how many, and which."""
    parts = []
    for status in ("firing", "resolved"):
        mine = [a for a in alerts if a["status"] == status]
        if mine:
            names = ", ".join(f"{a['rule']} on {printable(a['node'])}" for a in mine[:SUBJECT_NAMES])
            more = f" and {len(mine) - SUBJECT_NAMES} more" if len(mine) > SUBJECT_NAMES else ""
            parts.append(f"{status.upper()} {len(mine)}: {names}{more}")
    return f"[{printable(prefix)}] {'; '.join(parts)}"


def printable(text):
    """Node ids are data: no line break or control character may reach a mail header or a line of text."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def headline(alerts, prefix):
    firing = sum(a["status"] == "firing" for a in alerts)
    return f"{firing} firing, {len(alerts) - firing} resolved, nodes of {status_key(prefix)}:"


def text_lines(alerts):
    lines = []
    for a in alerts[:MAX_LINES]:
        when = f"since {a['starts_at']}" if a["status"] == "firing" else f"fired {a['starts_at']}"
        again = " (still firing)" if a.get("repeat") else ""
        name = printable(a["node"])
        lines.append(f"{a['status'].upper():8} {a['rule']:7} {name}: {printable(a['summary'])}, {when}{again}")
    if len(alerts) > MAX_LINES:
        lines.append(f"... and {len(alerts) - MAX_LINES} more")
    return lines


def html_table(alerts):
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in (
            a["status"].upper() + (" (again)" if a.get("repeat") else ""), a["rule"], a["node"], a["summary"],
            a["starts_at"])) + "</tr>"
        for a in alerts[:MAX_LINES])
    more = f"<p>... and {len(alerts) - MAX_LINES} more</p>" if len(alerts) > MAX_LINES else ""
    return ("<table border=\"1\" cellpadding=\"4\" cellspacing=\"0\">"
            "<tr><th>status</th><th>rule</th><th>node</th><th>details</th><th>fired</th></tr>"
            f"{rows}</table>{more}")


# ---------------------------------------------------------------------------- channels

class Mail:
    """Sends messages through SMTP (stdlib smtplib): UTF-8 plain text plus a small HTML table."""

    name = "mail"

    def __init__(self, cfg):
        self.cfg = cfg

    def describe(self):
        return f"mail to {', '.join(self.cfg.to)} via {self.cfg.smtp_host}:{self.cfg.smtp_port}"

    def send(self, alerts, prefix, recipients=None):
        text = "\n".join([headline(alerts, prefix), ""] + text_lines(alerts)) + "\n"
        page = f"<p>{html.escape(headline(alerts, prefix))}</p>{html_table(alerts)}"
        return self.deliver(self.message(subject(alerts, prefix), text, f"<html><body>{page}</body></html>"),
                            recipients or self.cfg.to)

    def send_test(self, prefix):
        msg = self.message(f"[{printable(prefix)}] test message from alert.py",
                           f"alert.py can send mail to {', '.join(self.cfg.to)} (sent {iso(time.time())}).\n")
        refused = self.deliver(msg, self.cfg.to)
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)

    def message(self, subject_line, text, html_part=None):
        msg = EmailMessage()
        msg["Subject"] = subject_line
        msg["From"] = self.cfg.from_addr
        msg["To"] = ", ".join(self.cfg.to)
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=socket.gethostname())
        msg.set_content(text, charset="utf-8")
        if html_part:
            msg.add_alternative(html_part, subtype="html", charset="utf-8")
        return msg

    def deliver(self, msg, recipients):
        """Send ``msg`` to ``recipients``; returns those refused. The accepted ones have it then, unless all
        were refused: then nobody has it, and each refused recipient is returned."""
        cfg = self.cfg
        if cfg.smtp_security == "ssl":
            server = smtplib.SMTP_SSL(cfg.smtp_host, cfg.smtp_port, timeout=SEND_TIMEOUT,
                                      context=ssl.create_default_context())
        else:
            server = smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=SEND_TIMEOUT)
        with server:
            if cfg.smtp_security == "starttls":
                server.starttls(context=ssl.create_default_context())
            if cfg.smtp_user:
                server.login(cfg.smtp_user, cfg.smtp_password or "")
            try:
                refused = server.send_message(msg, to_addrs=recipients)
            except smtplib.SMTPRecipientsRefused as exc:  # no DATA was sent: nobody has it
                refused = {to: exc.recipients.get(to, (451, b"not sent: other recipients refused"))
                           for to in recipients}
        return {to: (code, as_text(reply)) for to, (code, reply) in refused.items()}


class Webhook:
    """POSTs each message as JSON: a Slack-compatible ``text`` plus the structured ``alerts``."""

    name = "webhook"

    def __init__(self, cfg):
        self.url = cfg.webhook_url
        self.format = cfg.webhook_format

    def describe(self):
        return f"webhook {safe_url(self.url)}"

    def send(self, alerts, prefix, recipients=None):
        if self.format == "alertmanager":
            self.post(alertmanager_webhook_body(alerts, prefix))
            return {}
        text = "\n".join([subject(alerts, prefix)] + text_lines(alerts))
        # Slack reads <...> as links and & as an entity: its docs ask for these three escaped.
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        self.post({"text": text, "prefix": prefix,
                   "firing": sum(a["status"] == "firing" for a in alerts),
                   "resolved": sum(a["status"] == "resolved" for a in alerts), "alerts": alerts})
        return {}

    def send_test(self, prefix):
        self.post({"text": f"[{prefix}] test message from alert.py", "alerts": [], "prefix": prefix,
                   "firing": 0, "resolved": 0})

    def post(self, body):
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), method="POST",
            headers={"Content-Type": "application/json; charset=utf-8",
                     "User-Agent": "scrapy-cluster-monitor"})
        with urllib.request.urlopen(request, timeout=SEND_TIMEOUT) as response:
            response.read()


class Console:
    """Prints each message: what alert.py does when no channel is configured."""

    name = "console"

    def __init__(self, out):
        self.out = out

    def describe(self):
        return "the console only (no channel: set ALERT_TO, ALERT_WEBHOOK_URL or ALERT_NOTIFY_URLS)"

    def send(self, alerts, prefix, recipients=None):
        print("\n  ".join([f"{iso(time.time())} {subject(alerts, prefix)}"] + text_lines(alerts)),
              file=self.out, flush=True)
        return {}

    def send_test(self, prefix):
        print(f"[{printable(prefix)}] test message from alert.py", file=self.out, flush=True)


# Alertmanager takes a firing alert as resolved when it is not posted again before its endsAt: like
# Prometheus, say it ends this many evaluations from now, so each evaluation's re-post keeps it firing.
ALERTMANAGER_RESEND = 4
# What Alertmanager's webhook says for the end of an alert that has not ended.
ZERO_TIME = "0001-01-01T00:00:00Z"


def alertmanager_alert(a, ends_at):
    """One alert as Alertmanager's API takes it, from a notification (or a firing record made one)."""
    labels = {"alertname": a["alertname"], "severity": a["severity"], "node": a["node"], "spider": a.get("spider"),
              "host": a.get("host")}
    return {"labels": {k: str(v) for k, v in labels.items() if v},
            "annotations": {"summary": f"{a['alertname']} on {a['node']}: {a['summary']}",
                            "description": f"{a['rule']} alert on node {a['node']} (spider {a.get('spider')}, "
                                           f"host {a.get('host')}): {a['summary']}"},
            "startsAt": a["starts_at"], "endsAt": ends_at}


def alertmanager_webhook_body(alerts, prefix):
    """ALERT_WEBHOOK_FORMAT=alertmanager: Alertmanager's webhook body (version 4) for one message."""
    out = []
    for a in alerts:
        one = alertmanager_alert(a, a["ends_at"] or ZERO_TIME)
        key = json.dumps(one["labels"], sort_keys=True).encode()
        out.append({"status": a["status"], **one, "generatorURL": "",
                    "fingerprint": hashlib.sha256(key).hexdigest()[:16]})
    common = [set(a["labels"].items()) for a in out]
    notes = [set(a["annotations"].items()) for a in out]
    return {"version": "4", "groupKey": f"{{}}:{{prefix={json.dumps(prefix)}}}", "truncatedAlerts": 0,
            "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
            "receiver": "scrapy-cluster-monitor", "groupLabels": {},
            "commonLabels": dict(set.intersection(*common)) if common else {},
            "commonAnnotations": dict(set.intersection(*notes)) if notes else {},
            "externalURL": "", "alerts": out}


class Alertmanager(Webhook):
    """ALERT_ALERTMANAGER_URL: each evaluation posts every firing alert that was sent (not silenced) and what
    resolved, to /api/v2/alerts, so Alertmanager's own grouping, inhibition, silences and receivers apply.
    Not through the outbox: the next evaluation posts the current state again."""

    name = "alertmanager"

    def __init__(self, cfg):
        self.url = cfg.alertmanager_url.rstrip("/") + "/api/v2/alerts"
        self.interval = cfg.interval
        self.outage = Outage(logger)

    def sync(self, state, notes, now):
        alerts = [alertmanager_alert(a, a["ends_at"]) for a in notes if a["status"] == "resolved"]
        ends = iso(now + ALERTMANAGER_RESEND * self.interval)
        for field, record in state.items():
            if record["state"] == "firing" and record.get("notified", True) and not record.get("silenced"):
                rule, _, node = field.partition(":")
                a = {**record, "rule": rule, "node": node, "starts_at": iso(record["fired"]),
                     "alertname": RULE[rule].alertname, "severity": RULE[rule].severity,
                     "summary": record.get("summary", "")}
                alerts.append(alertmanager_alert(a, ends))
        if not alerts:
            return
        try:
            within(SEND_DEADLINE, self.post, alerts)
        except Exception as exc:  # noqa: BLE001 - the next evaluation posts again
            self.outage.failed("Alert: cannot post to %s (%s); posting again each evaluation", self.describe(),
                               one_line(exc, self.url))
            return
        self.outage.ok("Alert: %s takes alerts again", self.describe())

    def describe(self):
        return f"Alertmanager {safe_url(self.url)}"


class Notify:
    """One Apprise URL (ALERT_NOTIFY_URLS): Telegram, Discord, Teams, DingTalk, Feishu, WeCom, ntfy, Matrix...
    Its URL is never logged (tokens sit in its host and path): only its scheme."""

    def __init__(self, url):
        import apprise  # here: only alert.py processes with ALERT_NOTIFY_URLS pay for it

        self.url = url
        self.scheme = url.partition("://")[0].lower()
        # Stable across restarts (the outbox names it) and says nothing of the URL.
        self.name = f"notify:{self.scheme}:{hashlib.sha256(url.encode()).hexdigest()[:8]}"
        self.apprise = apprise.Apprise()
        self.apprise.add(url)

    def describe(self):
        return f"Apprise {self.scheme}://..."

    def send(self, alerts, prefix, recipients=None):
        self.notify(subject(alerts, prefix), "\n".join([headline(alerts, prefix)] + text_lines(alerts)))
        return {}

    def send_test(self, prefix):
        self.notify(f"[{printable(prefix)}] test message from alert.py", "alert.py can send here.")

    def notify(self, title, body):
        if not self.apprise.notify(title=title, body=body):
            raise ConnectionError(f"{self.describe()} did not take the notification")


def channels_for(cfg, out):
    channels = ([Mail(cfg)] if cfg.to else []) + ([Webhook(cfg)] if cfg.webhook_url else []) + notify_channels(cfg)
    return {channel.name: channel for channel in channels or [Console(out)]}


def notify_channels(cfg):
    return [Notify(url) for url in cfg.notify_urls or ()]


# ---------------------------------------------------------------------------- sending

def permanent(exc):
    """A refusal of the message itself, which no retry changes: a webhook's 4xx (but 408 and 429), or an SMTP
    5xx to its sender or its data. Timeouts, refused connections, login and TLS failures, a webhook's 5xx
    and SMTP 4xx are transient."""
    if isinstance(exc, urllib.error.HTTPError):
        return 400 <= exc.code < 500 and exc.code not in (408, 429)
    if isinstance(exc, (smtplib.SMTPSenderRefused, smtplib.SMTPDataError)):
        return exc.smtp_code >= 500
    return False


def within(seconds, send, *args):
    """``send(*args)`` with an overall deadline: its result, or its exception, or TimeoutError when it runs
    longer (it goes on in the background and may still arrive, so a retry can send it twice)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = send(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="alert-send", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def send_tests(channels, prefix, secrets=()):
    """Send one test message through every channel; returns how many failed."""
    failures = 0
    for channel in channels:
        try:
            within(SEND_DEADLINE, channel.send_test, prefix)
        except Exception as exc:  # noqa: BLE001 - reported, counted
            failures += 1
            logger.error("Alert: test message by %s failed: %s", channel.describe(), one_line(exc, *secrets))
        else:
            logger.info("Alert: test message sent by %s", channel.describe())
    return failures


def one_line(exc, *urls):
    """An exception on one line, without the URLs or passwords it may quote."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return scrub(f"{exc.__class__.__name__}: {text}", *urls)[:300]
