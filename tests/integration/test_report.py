"""The report in a real browser: headless Chromium opens the page the operators will open.

Its data is real output: two types delivered through the batch delivery path into a local
storage root (one hour closed in time, one long after, late events, duplicates and dead
letters), plus the auditor's ``counts.json``, one of which counts an event that never
arrived. The page must load offline without a console error, show every type, carry the
numbers that were sent (known from the messages, not from the manifests the page is built
from), and paint the lost and overdue hour red. Its screenshot is kept in the test's folder
and in ``.test-output/report.png``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import shutil
import time
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from event_delivery.cloud import files
from event_delivery.contract import envelope, partitions
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import load_registry
from pipelines.delivery import deliver
from pipelines.runtime import LOCAL_BATCH_RUNNER
from tests.by_id import assert_every_id_in_one_place
from tests.messages import message, raw_message, valid_fields
from tests.streams import local_keys, local_settings
from tools.ops import report
from tools.ops.audit import audit_type
from tools.ops.report_model import OUTCOMES

HOUR = partitions.HOUR_SECONDS
STABLE_SCREENSHOT = pathlib.Path(__file__).resolve().parents[2] / ".test-output" / "report.png"
RED, GREEN = "rgb(255, 235, 233)", "rgb(218, 251, 225)"  # the page's --bad and --ok cell backgrounds


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium, driven by Playwright; a missing browser fails in CI and skips elsewhere."""
    executable = shutil.which("chromium")
    if not executable:
        reason = (
            "Debian's chromium is not installed (apt-get install -y chromium): the report was not seen in a browser"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


def run_batch(root, event_type, keys, messages, run_id):
    """Delivers ``messages`` with the batch runner, and leaves the markers as a streaming job
    closing those past hours now would have written them: its close times count."""
    settings = local_settings(root, event_type, keys, run_id, trigger_seconds=None, window_seconds=HOUR)
    with beam.Pipeline(options=PipelineOptions([], runner=LOCAL_BATCH_RUNNER)) as pipeline:
        deliver(pipeline | "Messages" >> beam.Create(messages), settings)
    for marker in files.glob(f"{root}/delivered/{event_type.name}/dt=*/hr=*/_SUCCESS"):
        files.write_json(marker, {**files.read_json(marker), "replayed": False})


def iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def write_counts(root, event_type: str, hour_start: int, published: int, distinct_ids: int):
    """What the auditor writes at an hour's close."""
    partition = partitions.partition(hour_start)
    files.write_json(
        partitions.join(root, "audit", event_type, partition, "counts.json"),
        {
            "event_type": event_type,
            "hour_start": iso(hour_start),
            "hour_end": iso(hour_start + HOUR),
            "published": published,
            "distinct_ids": distinct_ids,
            "source": "subscription",
            "written_at": iso(time.time()),
        },
    )


@dataclasses.dataclass(frozen=True)
class Sent:
    """What a test sent into one hour, by the outcome each message must have: the numbers the page
    must show, known without reading any manifest. ``lost`` messages the auditor counts that
    never arrive."""

    delivered: int = 0
    duplicates: int = 0
    late: int = 0
    dead_lettered: int = 0
    lost: int = 0

    @property
    def numbers(self) -> dict[str, int]:
        outcomes = {name: getattr(self, name) for name in OUTCOMES}
        return {**outcomes, "published": sum(outcomes.values()) + self.lost}

    @property
    def distinct_ids(self) -> int:
        return self.numbers["published"] - self.duplicates


@pytest.fixture(scope="module")
def storage_root(tmp_path_factory):
    """Real delivered output of two types, and the auditor's counts of what was published.

    The hours lie in the past so that their markers are written now: service_log's recent
    hour closes within its tier's budget (low: 2 h 15 min), its older one long after, and
    so does play's (high: 15 min). Returns the root, what was sent into each hour, and the
    messages sent of each type.
    """
    root = str(tmp_path_factory.mktemp("storage"))
    keys = local_keys(root)
    keys.open(create=True)  # what provisioning does: the KEK and the keystore
    registry = load_registry()
    this_hour = int(time.time()) // HOUR * HOUR
    recent, old = this_hour - 2 * HOUR, this_hour - 6 * HOUR
    log, play = registry["service_log"], registry["play"]

    def events(event_type, prefix, hour, n):
        return [message(valid_fields(event_type, i), f"{prefix}{i}", (hour + 60 * i) * 1000) for i in range(n)]

    recent_log, old_log, late_log = events(log, "a", recent, 10), events(log, "b", old, 5), events(log, "late", old, 2)
    repeats = [recent_log[1], recent_log[3]]
    bad = [
        raw_message(b"{oops", "bad-1", received_at=str(recent * 1000)),
        message({"unknown": 1}, "bad-2", recent * 1000),
    ]
    run_batch(root, log, keys, [*recent_log, *repeats, *bad, *old_log], "run1")
    run_batch(root, log, keys, late_log, "run2")  # its hour has closed: late
    played = events(play, "p", recent, 6)
    run_batch(root, play, keys, [*played, played[0]], "run1")
    sent = {
        "service_log": {
            recent: Sent(delivered=len(recent_log), duplicates=len(repeats), dead_lettered=len(bad)),
            old: Sent(delivered=len(old_log), late=len(late_log), lost=1),  # one more counted than arrived
        },
        "play": {recent: Sent(delivered=len(played), duplicates=1)},
    }
    for name, hours in sent.items():
        for start, hour in hours.items():
            write_counts(root, name, start, hour.numbers["published"], hour.distinct_ids)
    messages = {"service_log": [*recent_log, *repeats, *bad, *old_log, *late_log], "play": [*played, played[0]]}
    ids = {name: [m.attributes[envelope.EVENT_ID] for m in sent_messages] for name, sent_messages in messages.items()}
    return root, sent, ids


def dead_letter_kinds(root: str, event_type: str) -> Counter:
    paths = files.glob(f"{root}/dead-letter/{event_type}/dt=*/hr=*/*.avro")
    return Counter(record["error_kind"].lower() for path in paths for record in files.read_avro(path))


def test_the_report_shows_every_type_with_the_numbers_sent_and_red_where_an_slo_breaks(
    chromium, storage_root, tmp_path
):
    root, sent, ids = storage_root
    registry = load_registry()
    output = report.write_report(root, HOUR, sorted(registry), str(tmp_path / "report.html"))

    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(pathlib.Path(output).as_uri())
    screenshot = tmp_path / "report.png"
    page.screenshot(path=str(screenshot), full_page=True)
    STABLE_SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copy(screenshot, STABLE_SCREENSHOT)
    print(f"\nreport screenshot: {screenshot} (and {STABLE_SCREENSHOT})")

    assert errors == []
    assert requests == [pathlib.Path(output).as_uri()], "the page needs nothing beyond its own file"
    for name in registry:
        assert page.locator(f'#summary tr[data-type="{name}"]').count() == 1
        charts = page.locator(f'#type-{name} figure[data-type="{name}"]')
        assert sorted(charts.evaluate_all("figures => figures.map(f => f.dataset.chart)")) == [
            "close-delay",
            "dead-letter-kinds",
            "volumes",
        ]
        assert all(charts.evaluate_all("figures => figures.map(f => f.querySelector('figcaption').textContent)"))
        svgs = page.locator(f"#type-{name} svg")
        assert svgs.count() == 2 and all(
            svgs.evaluate_all("svgs => svgs.map(s => s.querySelector('title')?.textContent)")
        )

    cells = page.locator("td[data-hour]").evaluate_all(
        """tds => tds.map(td => [td.dataset.type, td.dataset.hour, td.dataset.metric, td.textContent,
                                 getComputedStyle(td).backgroundColor])"""
    )
    shown = {(t, h, m): text for t, h, m, text, _ in cells}
    colour = {(t, h, m): bg for t, h, m, _, bg in cells}
    for name, hours in sent.items():
        # Against what was sent, by id and by count: the audit reads the same manifests as the page.
        dead = [i for i in ids[name] if i.startswith("bad-")]
        assert_every_id_in_one_place(root, name, ids[name], dead)
        audited = audit_type(Layout.under(root, name, HOUR))
        assert sorted(audited.hours) == sorted(partitions.partition(start) for start in hours)
        kinds = dict(
            page.locator(f'td[data-type="{name}"][data-metric="dead_letter_kind"]').evaluate_all(
                "tds => tds.map(td => [td.dataset.kind, Number(td.textContent.replaceAll(',', ''))])"
            )
        )
        assert (
            kinds
            == dead_letter_kinds(root, name)
            == sum((h.dead_letter_kinds for h in audited.hours.values()), Counter())
        )
        for start, hour in hours.items():
            partition = partitions.partition(start)
            for metric, value in hour.numbers.items():
                assert int(shown[name, partition, metric].replace(",", "")) == value, (name, partition, metric)
                assert getattr(audited.hours[partition], metric) == value, (name, partition, metric)
            assert int(shown[name, partition, "lost"]) == hour.lost
        for metric in ("published", "delivered", "duplicates", "late", "dead_lettered"):
            total = page.locator(f'#summary td[data-type="{name}"][data-metric="{metric}"]').text_content()
            assert int(total.replace(",", "")) == sum(h.numbers[metric] for h in hours.values()), (name, metric)

    recent, old = (partitions.partition(start) for start in sent["service_log"])
    assert colour["service_log", recent, "lost"] == GREEN and colour["service_log", recent, "close_delay"] == GREEN
    assert shown["service_log", old, "lost"] == "1"
    assert colour["service_log", old, "lost"] == RED, "an hour that lost an event is red"
    assert colour["service_log", old, "close_delay"] == RED, "an hour that closed past its deadline is red"
    assert colour["play", recent, "close_delay"] == RED, "a high-tier hour closed an hour late is red"
    summary = page.locator('#summary td[data-type="service_log"][data-metric="lost"]')
    assert summary.evaluate("td => getComputedStyle(td).backgroundColor") == RED
    assert summary.text_content() == "1"
