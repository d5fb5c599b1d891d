"""The end-to-end demo: every event type delivered at once, on the local emulators.

It starts the Pub/Sub and GCS emulators, provisions topics, subscriptions and the
bucket, and runs one delivery job per type on the DirectRunner with 10-second
"hours". It feeds each job generated traffic with duplicates, malformed and late
events, waits until every hour with data has closed, stops everything and prints
what happened to every message, and what the gateway counted::

    python -m tools.local.demo            # or: make demo

The traffic comes through both doors (``tools.local.gateway_door``): every well-formed
event through the gateway (``python -m gateway``, started on the emulators), and straight
to Pub/Sub only what a gateway cannot produce (malformed payloads and attributes, events
stamped in the past to be late, producer retries with the same id), as a misbehaving
producer with its own Pub/Sub access would.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import random
import shutil
import sys
import threading
import time

from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import load_registry
from event_delivery.keys.config import KeyConfig
from event_delivery.producer import EventPublisher
from tools.local.emulators import EmulatorError, running_emulators
from tools.local.gateway_door import GatewayCounts, TwoDoors, gateway_counts, send_traffic
from tools.local.gateway_process import Gateway
from tools.local.jobs import JobError, start_auditor, start_job, stop_jobs
from tools.local.loadgen import Ledger, TrafficMix, publish_traffic, traffic
from tools.ops import provision
from tools.ops.audit import format_table as audit_table
from tools.ops.audit_model import TypeAudit
from tools.ops.audit_scan import audit_type, hours_settled
from tools.ops.report import write_report


@dataclasses.dataclass
class Scenario:
    """A short local run: small windows so that hours close in seconds."""

    types: list[str]
    project: str = "local-project"
    bucket: str = "event-delivery-demo"
    window_seconds: int = 10
    allowed_lateness_seconds: int = 5
    trigger_seconds: int = 2
    late_horizon_seconds: int = 600
    num_shards: int = 2
    publish_seconds: float = 25
    rate: float = 10
    mix: TrafficMix = dataclasses.field(
        default_factory=lambda: TrafficMix(duplicates=0.08, malformed=0.04, late=0.04, late_by_seconds=20)
    )
    close_timeout_seconds: float = 300  # generous: a wait that ends as soon as all is accounted for
    raw_archive: bool = False  # the jobs also archive every message they read, under <storage_root>/raw
    through_gateway: bool = False  # well-formed events go through the gateway (make demo), the rest to Pub/Sub

    @property
    def storage_root(self) -> str:
        return f"gs://{self.bucket}"

    def job_args(self, state_dir: pathlib.Path) -> list[str]:
        return [
            f"--keystore=sqlite:///{state_dir.resolve()}/keystore.db",
            f"--local_key_file={state_dir.resolve()}/kek.key",
            *self._hours_args(),
            f"--num_shards={self.num_shards}",
            *([f"--raw_archive_root={self.storage_root}/raw"] if self.raw_archive else []),
        ]

    def gateway_args(self) -> list[str]:
        return [f"--window_seconds={self.window_seconds}"]

    def auditor_args(self) -> list[str]:
        return [*self._hours_args(), f"--check_delay_seconds={self.trigger_seconds}"]

    def _hours_args(self) -> list[str]:
        """What the delivery jobs and the auditor must agree on: where, and the hours."""
        return [
            f"--project={self.project}",
            f"--storage_root={self.storage_root}",
            f"--window_seconds={self.window_seconds}",
            f"--allowed_lateness_seconds={self.allowed_lateness_seconds}",
            f"--trigger_seconds={self.trigger_seconds}",
            f"--late_horizon_seconds={self.late_horizon_seconds}",
        ]

    def audit(self, event_type: str) -> TypeAudit:
        return audit_type(self.layout(event_type))

    def layout(self, event_type: str) -> Layout:
        return Layout.under(self.storage_root, event_type, self.window_seconds)


class NotAccounted(JobError):
    """The jobs ran, but their output did not account for every message in time."""


@dataclasses.dataclass
class Outcome:
    ledger: Ledger
    audit: TypeAudit
    gateway: GatewayCounts | None = None  # when the traffic came through the gateway

    @property
    def accounted(self) -> int:
        return sum(self.audit.total(name) for name in ("delivered", "duplicates", "late", "dead_lettered"))

    @property
    def balanced(self) -> bool:
        gateway_balanced = self.gateway is None or self.gateway.accepted == self.gateway.sent
        return self.accounted == self.ledger.published and not self.audit.problems and gateway_balanced

    @property
    def missing(self) -> list[str]:
        """What the type's output still lacks, if anything: messages, closed hours, the auditor's counts."""
        a, missing = self.audit, list(self.audit.problems)
        if self.accounted != self.ledger.published:
            missing.append(f"{self.accounted} of {self.ledger.published} published messages accounted for")
        if not a.settled:
            missing.append(f"hours with data still open, {a.total('staged')} records staged")
        if not a.reconciled:
            missing.append("closed hours without the auditor's count, or that lost messages")
        return missing


def _publish_all(scenario: Scenario, say, gateway=None) -> tuple[dict[str, Ledger], dict[str, int]]:
    """Each type's ledger, and how many of its events went through ``gateway`` (if given)."""
    registry = load_registry()
    ledgers, sent_to_gateway, threads = {}, {}, []
    count = int(scenario.publish_seconds * scenario.rate)

    def publish(name, seed):
        messages = traffic(registry[name], count, scenario.mix, random.Random(seed))
        publisher = EventPublisher(scenario.project, registry[name], window_seconds=scenario.window_seconds)
        if gateway is None:
            ledgers[name] = publish_traffic(publisher, messages, scenario.rate)
        else:
            doors = send_traffic(TwoDoors(gateway, publisher, scenario.window_seconds), messages, scenario.rate)
            ledgers[name], sent_to_gateway[name] = doors.ledger, doors.sent_to_gateway

    for seed, name in enumerate(scenario.types):
        threads.append(threading.Thread(target=publish, args=(name, seed), name=f"publish-{name}"))
    for thread in threads:
        thread.start()
    started = time.monotonic()
    while any(thread.is_alive() for thread in threads):
        time.sleep(2)
        say(f"  publishing... {time.monotonic() - started:4.0f}s of {scenario.publish_seconds:.0f}s")
    for thread in threads:
        thread.join()
    missing = [name for name in scenario.types if name not in ledgers]
    if missing:
        raise JobError(f"publishing failed for {', '.join(missing)}; see the error above")
    return ledgers, sent_to_gateway


def _all_hours_closed(scenario: Scenario) -> bool:
    return all(hours_settled(scenario.layout(name)) for name in scenario.types)


def run_scenario(scenario: Scenario, state_dir: pathlib.Path, say=print) -> dict[str, Outcome]:
    """Runs the scenario on the emulators ``os.environ`` points at; returns each type's ledger and audit."""
    use_emulator_credentials()
    # The gateway serves every registered type, and checks at start that each one's topic exists.
    provisioned = sorted(load_registry()) if scenario.through_gateway else scenario.types
    provision.provision(scenario.project, [load_registry()[n] for n in provisioned], scenario.bucket)
    KeyConfig(f"sqlite:///{state_dir.resolve()}/keystore.db", f"{state_dir.resolve()}/kek.key").provision()
    say(f"{len(provisioned)} types provisioned; starting one delivery job per type of {len(scenario.types)}")
    jobs = [start_job(name, scenario.job_args(state_dir), state_dir / "logs") for name in scenario.types]
    jobs.append(start_auditor(scenario.types, scenario.auditor_args(), state_dir / "logs"))
    try:
        for job in jobs:
            job.wait_ready()
        say(f"jobs running; publishing for {scenario.publish_seconds:.0f}s at {scenario.rate:.0f} msg/s per type")
        if not scenario.through_gateway:
            return _wait_until_accounted(scenario, jobs, _publish_all(scenario, say)[0], say)
        ledgers, counts = _publish_through_gateway(scenario, state_dir, say)
        outcomes = _wait_until_accounted(scenario, jobs, ledgers, say)
        return {name: dataclasses.replace(outcome, gateway=counts[name]) for name, outcome in outcomes.items()}
    finally:
        stop_jobs(jobs)


def _publish_through_gateway(scenario: Scenario, state_dir: pathlib.Path, say):
    """Each type's ledger and gateway counts, the gateway stopped: it has drained its spill and
    sent the audit its final counts."""
    (state_dir / "gateway").mkdir(parents=True, exist_ok=True)
    try:
        gateway = Gateway(state_dir / "gateway" / "spill", "--project", scenario.project, *scenario.gateway_args())
    except RuntimeError as error:
        raise JobError(str(error)) from None
    try:
        say(f"gateway up on port {gateway.port}; its log: {gateway.log_path}")
        ledgers, sent = _publish_all(scenario, say, gateway)
        counts = gateway_counts(gateway.metrics())
    finally:
        gateway.stop()
    return ledgers, {name: dataclasses.replace(counts.get(name, GatewayCounts()), sent=sent[name]) for name in ledgers}


def _wait_until_accounted(scenario: Scenario, jobs, ledgers: dict[str, Ledger], say) -> dict[str, Outcome]:
    """Each type's outcome once its hours have closed and every message it published is
    accounted for (late panes come after the last close). Raises ``NotAccounted``, naming what
    never happened, if that takes longer than the last close plus ``close_timeout_seconds``."""
    # The last hour closes one window plus the lateness after the last publish.
    deadline = time.monotonic() + scenario.window_seconds + scenario.allowed_lateness_seconds
    deadline += scenario.close_timeout_seconds
    say("published; waiting until every message is accounted for and every hour closed")
    while True:
        time.sleep(2)
        for job in jobs:
            if job.process.poll() is not None:
                raise JobError(f"the {job.event_type} job died:\n{job.log_tail()}")
        closed, past_deadline = _all_hours_closed(scenario), time.monotonic() > deadline
        if closed or past_deadline:
            outcomes = {name: Outcome(ledgers[name], scenario.audit(name)) for name in scenario.types}
            missing = {name: outcome.missing for name, outcome in outcomes.items() if outcome.missing}
            if not missing:
                return outcomes
            if past_deadline:
                lines = (f"  {name}: {'; '.join(what)}" for name, what in missing.items())
                raise NotAccounted("not everything was accounted for in time:\n" + "\n".join(lines))


GATEWAY_COLUMNS = ("sent", "accepted", "published", "spilled", "shed", "rejected")


def format_table(outcomes: dict[str, Outcome]) -> str:
    """What became of each type's messages; with the gateway's counts (``gw``) when it had traffic."""
    registry = load_registry()
    through_gateway = any(outcome.gateway for outcome in outcomes.values())
    header = ("type", "tier", "published", "delivered", "duplicates", "late", "dead-lettered", "closed hrs")
    header += tuple(f"gw {column}" for column in GATEWAY_COLUMNS) if through_gateway else ()
    header += ("balanced",)
    rows = [header]
    for name, outcome in outcomes.items():
        a = outcome.audit
        gateway = outcome.gateway or GatewayCounts()
        rows.append(
            (
                name,
                registry[name].tier.name,
                str(outcome.ledger.published),
                str(a.total("delivered")),
                str(a.total("duplicates")),
                str(a.total("late")),
                str(a.total("dead_lettered")),
                str(a.closed_hours),
                *(str(getattr(gateway, column)) for column in GATEWAY_COLUMNS if through_gateway),
                "yes" if outcome.balanced else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _parser(registry) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.local.demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--state_dir",
        type=pathlib.Path,
        default=pathlib.Path(".demo"),
        help="Emulator data, job logs and the delivered output. Default: .demo",
    )
    parser.add_argument("--event_type", action="append", choices=sorted(registry), help="Default: every type.")
    parser.add_argument("--publish_seconds", type=float, default=25)
    parser.add_argument("--rate", type=float, default=10, help="Messages per second per type.")
    return parser


def _print_outcomes(outcomes: dict) -> None:
    print()
    print(format_table(outcomes))
    print()
    print("The auditor's count of what was published, joined with the output (make audit):")
    print(audit_table([outcome.audit for outcome in outcomes.values()]))
    print()
    print(
        "published = delivered + duplicates + late + dead-lettered, and gw sent = gw accepted:",
        "holds for every type" if all(o.balanced for o in outcomes.values()) else "VIOLATED",
    )
    print("gw: the demo's events sent through the gateway, and the gateway's own counts (its /metrics);")
    print("the rest (malformed, late, retries) went straight to Pub/Sub.")
    for name, outcome in outcomes.items():
        for problem in outcome.audit.problems:
            print(f"problem in {name}: {problem}")


def _where_to_look(state_dir: pathlib.Path, bucket: str, report: str) -> str:
    data = state_dir / "gcs-data" / ".cloudstorage" / bucket
    keys = f"--keystore sqlite:///{state_dir}/keystore.db --local_key_file {state_dir}/kek.key"
    read = "import fastavro,sys; [print(r) for r in fastavro.reader(open(sys.argv[1],'rb'))]"
    return f"""The output stays on disk under {data}/:
  delivered/<type>/dt=YYYY-MM-DD/hr=HH-MM-SS/*.avro and _SUCCESS, late/..., dead-letter/...
Read a file with:  .venv/bin/python -c "{read}" <file.avro>
Job logs: {state_dir / "logs"}/<type>.log
Personal fields are encrypted. A decrypted copy of every search hour:
  .venv/bin/python -m pipelines.decrypt --event_type search --input_root {data}/delivered \
--output_root {state_dir}/decrypted --start 2000-01-01T00 --end 2100-01-01T00 {keys} \
--copies_inventory {state_dir}/decrypted-copies
The report, to open in a browser: {report}"""


def main(argv=None) -> int:
    registry = load_registry()
    args = _parser(registry).parse_args(argv)
    shutil.rmtree(args.state_dir, ignore_errors=True)
    scenario = Scenario(
        types=args.event_type or sorted(registry),
        publish_seconds=args.publish_seconds,
        rate=args.rate,
        through_gateway=True,
    )
    started = time.monotonic()
    say = lambda line: print(line, flush=True)  # noqa: E731
    try:
        with running_emulators(args.state_dir):
            say("emulators up")
            outcomes = run_scenario(scenario, args.state_dir, say)
            report = write_report(
                scenario.storage_root, scenario.window_seconds, scenario.types, str(args.state_dir / "report.html")
            )
    except (EmulatorError, JobError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print_outcomes(outcomes)
    print(f"\nfinished in {time.monotonic() - started:.0f}s. {_where_to_look(args.state_dir, scenario.bucket, report)}")
    return 0 if all(o.balanced for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
