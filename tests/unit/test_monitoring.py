"""Alerts and dashboards as code: they parse into the client's types, they name metrics that
really exist, their thresholds follow the tier, and applying them twice changes nothing.

Cloud Monitoring has no emulator, so applying is tested against an in-memory stand-in of
the three calls it makes per client (list, create, update).
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import promql_parser
import pytest
from google.api_core import exceptions
from google.cloud import monitoring_dashboard_v1, monitoring_v3

from event_delivery.contract import slo
from event_delivery.contract.counts import counts_subscription
from event_delivery.contract.registry import AUDIT_SUBSCRIPTION, TIERS, load_registry, tier_types
from tools.ops import alerts, monitoring, monitoring_queries
from tools.ops.deploy import job_name

ROOT = pathlib.Path(__file__).parents[2]

# The documented metric types of the services the jobs run on, and their monitored resources
# (cloud.google.com/monitoring/api/metrics_gcp: Pub/Sub and Dataflow).
SERVICE_METRICS = {
    "pubsub.googleapis.com/subscription/oldest_unacked_message_age": "pubsub_subscription",
    "pubsub.googleapis.com/subscription/num_undelivered_messages": "pubsub_subscription",
    "dataflow.googleapis.com/job/data_watermark_age": "dataflow_job",
    "dataflow.googleapis.com/job/system_lag": "dataflow_job",
    "dataflow.googleapis.com/job/is_failed": "dataflow_job",
    "dataflow.googleapis.com/job/current_num_vcpus": "dataflow_job",
    "dataflow.googleapis.com/job/user_counter": "dataflow_job",  # Beam metrics, named by label metric_name
}
PROMQL_NAMES = {monitoring_queries.promql_name(metric): metric for metric in SERVICE_METRICS}


@pytest.fixture(scope="module")
def printed():
    """What ``--dry_run`` prints, as a machine without credentials runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "tools.ops.monitoring", "--dry_run"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def policies(printed):
    return [monitoring_v3.AlertPolicy.from_json(json.dumps(p)) for p in printed["alert_policies"]]


@pytest.fixture(scope="module")
def boards(printed):
    return [monitoring_dashboard_v1.Dashboard.from_json(json.dumps(d)) for d in printed["dashboards"]]


def _conditions(policies):
    return [(policy, condition) for policy in policies for condition in policy.conditions]


def _filters(policies, boards) -> list[str]:
    found = []
    for _, condition in _conditions(policies):
        for kind in ("condition_threshold", "condition_absent"):
            if condition._pb.HasField(kind):
                found.append(getattr(condition, kind).filter)
    for board in boards:
        for tile in board.mosaic_layout.tiles:
            for data_set in tile.widget.xy_chart.data_sets:
                if data_set.time_series_query.time_series_filter.filter:
                    found.append(data_set.time_series_query.time_series_filter.filter)
    return found


def _promql(policies, boards) -> list[str]:
    found = [c.condition_prometheus_query_language.query for _, c in _conditions(policies)]
    for board in boards:
        for tile in board.mosaic_layout.tiles:
            found += [d.time_series_query.prometheus_query for d in tile.widget.xy_chart.data_sets]
    return [query for query in found if query]


def _selectors(query: str) -> list[tuple[str, dict]]:
    """The metric name and label matchers (label -> (operator, value)) of each selector in a query."""
    selectors = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name: (str(m.op).rsplit(".", 1)[-1], m.value) for m in node.matchers.matchers}
            selectors.append((node.name, matchers))

    promql_parser.walk(promql_parser.parse(query), visit)
    return selectors


def _one_of(filter_: str, label: str) -> list[str]:
    match = re.search(re.escape(label) + r" = one_of\(([^)]*)\)", filter_)
    return json.loads(f"[{match.group(1)}]") if match else []


def _policy(policies, tier: str, title: str):
    [policy] = [p for p in policies if p.display_name == monitoring_queries.display_name(tier, title)]
    return policy


# What the jobs register: every Metrics.counter / .distribution call in the shipped code.


def _resolve(node, module_constants: dict):
    """A metric name argument as ``("name", value)`` or ``("prefix", value)``, or None if unknown."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return ("name", node.value)
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return ("prefix", node.values[0].value)
    if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "dead_lettered":
        return ("prefix", slo.DEAD_LETTERED_PREFIX)
    name = getattr(node, "attr", getattr(node, "id", None))
    value = module_constants.get(name, getattr(slo, name, None)) if name else None
    return ("name", value) if isinstance(value, str) else None


def registered_metrics() -> dict[str, set]:
    """``{"counter": {(kind, value)}, "distribution": {...}}`` over pipelines/, transforms/ and event_delivery/."""
    found = {"counter": set(), "distribution": set(), "gauge": set()}
    for folder in ("pipelines", "transforms", "event_delivery"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            constants = {
                target.id: node.value.value
                for node in tree.body
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                for target in node.targets
                if isinstance(target, ast.Name)
            }
            for node in ast.walk(tree):
                func = getattr(node, "func", None)
                if not (isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr in found):
                    continue
                owner = func.value
                if getattr(owner, "attr", getattr(owner, "id", None)) != "Metrics" or len(node.args) < 2:
                    continue
                resolved = _resolve(node.args[1], constants)
                if resolved:
                    found[func.attr].add(resolved)
    return found


def _is_registered(name: str, registered: dict) -> bool:
    """Whether a ``metric_name`` that a filter or query selects is one a job registers."""
    counters = registered["counter"]
    if name.endswith(".+"):  # a family: dead_lettered_<kind>
        return ("prefix", name[:-2]) in counters
    if ("name", name) in counters or any(k == "prefix" and name.startswith(v) for k, v in counters):
        return True
    base, suffix = name.rsplit("_", 1) if "_" in name else (name, "")
    return f"_{suffix}" in slo.DISTRIBUTION_SUFFIXES and ("name", base) in registered["distribution"]


def _selected_metric_names(policies, boards) -> set[str]:
    names = set()
    for filter_ in _filters(policies, boards):
        names.update(_one_of(filter_, "metric.label.metric_name"))
    for query in _promql(policies, boards):
        for _, matchers in _selectors(query):
            if "metric_name" in matchers:
                names.update(matchers["metric_name"][1].split("|"))
    return names


# The tests.


def test_every_policy_and_dashboard_parses_into_the_client_types(printed, policies, boards):
    assert [monitoring_v3.AlertPolicy.to_dict(p) for p in policies] == [
        monitoring_v3.AlertPolicy.to_dict(p) for p in monitoring.alert_policies()
    ]
    assert [monitoring_dashboard_v1.Dashboard.to_dict(d) for d in boards] == [
        monitoring_dashboard_v1.Dashboard.to_dict(d) for d in monitoring.dashboards()
    ]
    tiers_with_types = {t.tier.name for t in load_registry().values()}
    assert sorted(d.display_name for d in boards) == sorted(
        monitoring_queries.display_name(tier, "dashboard") for tier in tiers_with_types
    ), "one dashboard per tier"


def test_policies_are_well_formed_for_cloud_monitoring(policies):
    names = [p.display_name for p in policies]
    assert len(names) == len(set(names)), "applying matches policies by display name"
    for policy in policies:
        assert 1 <= len(policy.conditions) <= 6, policy.display_name  # Cloud Monitoring's limit per policy
        if any(c._pb.HasField("condition_prometheus_query_language") for c in policy.conditions):
            assert len(policy.conditions) == 1, f"{policy.display_name}: a PromQL policy has one condition"
        assert policy.combiner == monitoring_v3.AlertPolicy.ConditionCombinerType.OR
        assert policy.user_labels["system"] == "event-delivery"
        for condition in policy.conditions:
            for kind in ("condition_threshold", "condition_absent"):
                if condition._pb.HasField(kind):
                    seconds = getattr(condition, kind).duration.total_seconds()
                    assert seconds % 60 == 0, f"{condition.display_name}: durations are whole minutes"


def test_every_query_is_valid_promql(policies, boards):
    queries = _promql(policies, boards)
    assert queries
    for query in queries:
        promql_parser.parse(query)  # raises on a syntax error


def test_every_filter_names_a_metric_the_services_emit(policies, boards):
    filters = _filters(policies, boards)
    assert filters
    for filter_ in filters:
        [metric] = re.findall(r'metric\.type = "([^"]+)"', filter_)
        [resource] = re.findall(r'resource\.type = "([^"]+)"', filter_)
        assert SERVICE_METRICS.get(metric) == resource, filter_
    for query in _promql(policies, boards):
        for name, matchers in _selectors(query):
            assert name in PROMQL_NAMES, f"{name} in {query}"
            assert matchers["monitored_resource"] == ("Equal", SERVICE_METRICS[PROMQL_NAMES[name]])


def test_every_job_metric_selected_is_one_the_jobs_register(policies, boards):
    """A renamed or unwired Beam metric fails here, not silently in production."""
    registered = registered_metrics()
    selected = _selected_metric_names(policies, boards)
    assert {slo.RECEIVED, slo.HOURS_OVERDUE, slo.LOST, slo.CLOSE_DELAY_SECONDS + "_MAX"} <= selected
    missing = sorted(name for name in selected if not _is_registered(name, registered))
    assert not missing, f"selected by monitoring but registered by no job (Metrics.counter/distribution): {missing}"


def test_thresholds_follow_the_tier(policies):
    tiers = sorted(TIERS, key=lambda name: TIERS[name].recovery_order)  # high, normal, low

    def threshold(tier, title, index=0):
        condition = _policy(policies, tier, title).conditions[index]
        if condition._pb.HasField("condition_prometheus_query_language"):
            return promql_parser.parse(condition.condition_prometheus_query_language.query).rhs.val
        if condition._pb.HasField("condition_absent"):
            return condition.condition_absent.duration.total_seconds()
        return condition.condition_threshold.threshold_value

    tiers = [t for t in tiers if tier_types(t)]
    for title, index in (("backlog", 0), ("lag", 0), ("lag", 1), ("dead-letter rate", 0), ("not running", 1)):
        values = [threshold(tier, title, index) for tier in tiers]
        assert values == sorted(values) and len(set(values)) == len(values), (
            f"{title}: {dict(zip(tiers, values, strict=True))}"
        )
    for tier in tiers:
        goals = slo.objectives(TIERS[tier])
        assert threshold(tier, "dead-letter rate") == TIERS[tier].max_dead_letter_rate
        assert threshold(tier, "backlog") == goals.max_backlog_age_seconds < TIERS[tier].close_margin_seconds
        assert threshold(tier, "hours overdue") == 0
    assert threshold("all", "data lost") == 0


def test_every_subscription_and_job_of_a_tier_is_watched(policies):
    for event_type in load_registry().values():
        tier = event_type.tier.name
        backlog = _policy(policies, tier, "backlog")
        watched = [s for c in backlog.conditions for s in _one_of(c.condition_threshold.filter, "subscription_id")]
        assert event_type.subscription in watched
        audited = event_type.audit_subscription if event_type.tier.audit_source == AUDIT_SUBSCRIPTION else None
        assert (audited or counts_subscription(event_type)) in watched, "the auditor's subscription too"
        for title in ("lag", "not running"):
            for condition in _policy(policies, tier, title).conditions:
                spec = condition.condition_threshold if condition._pb.HasField("condition_threshold") else None
                filter_ = spec.filter if spec else condition.condition_absent.filter
                assert job_name(event_type) in _one_of(filter_, "resource.label.job_name"), (title, event_type.name)
        for title in ("dead-letter rate", "hours overdue"):
            [condition] = _policy(policies, tier, title).conditions
            for _, matchers in _selectors(condition.condition_prometheus_query_language.query):
                assert job_name(event_type) in matchers["job_name"][1].split("|")
        for other in set(TIERS) - {tier}:
            if tier_types(other):
                assert event_type.subscription not in str(_policy(policies, other, "backlog").conditions)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_service_levels_page_states_the_thresholds_in_force():
    page = (ROOT / alerts.RUNBOOK).read_text(encoding="utf-8")
    for name, tier in TIERS.items():
        goals = slo.objectives(tier)
        [row] = re.findall(rf"^\| `{name}` \|.*$", page, flags=re.MULTILINE)
        _, deadline, rate, lag, silent = (cell.strip() for cell in row.strip("|").split("|"))
        assert f"{tier.max_dead_letter_rate * 100:g} %" == rate, row
        assert lag.startswith(f"{goals.max_watermark_lag_seconds} s, held {goals.breach_for_seconds // 60} min"), row
        assert silent == f"{goals.not_running_after_seconds // 60} min", row
        minutes = goals.close_delay_budget_seconds // 60
        assert deadline.startswith(f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"), row


def test_every_policy_points_at_its_runbook_section(policies):
    anchors = _anchors((ROOT / alerts.RUNBOOK).read_text(encoding="utf-8"))
    for policy in policies:
        [anchor] = re.findall(re.escape(alerts.RUNBOOK) + r"#([\w-]+)", policy.documentation.content)
        assert anchor in anchors, f"{policy.display_name}: no section #{anchor} in {alerts.RUNBOOK}"


# Applying: idempotent, by display name.


class FakeAlertPolicies:
    """The three calls of ``AlertPolicyServiceClient`` that applying makes, in memory."""

    def __init__(self, *existing):
        self.stored = {}
        self.calls = []
        for policy in existing:
            self.create_alert_policy(name="projects/p", alert_policy=policy)

    def list_alert_policies(self, name):
        assert monitoring_v3.ListAlertPoliciesRequest(name=name).name == "projects/p"
        return list(self.stored.values())

    def create_alert_policy(self, name, alert_policy):
        monitoring_v3.CreateAlertPolicyRequest(name=name, alert_policy=alert_policy)  # the real request takes them
        self.calls.append("create")
        created = monitoring_v3.AlertPolicy(alert_policy)
        created.name = f"{name}/alertPolicies/{len(self.stored) + 1}"
        self.stored[created.name] = created
        return created

    def update_alert_policy(self, alert_policy):
        monitoring_v3.UpdateAlertPolicyRequest(alert_policy=alert_policy)
        self.calls.append("update")
        if alert_policy.name not in self.stored:
            raise exceptions.NotFound(alert_policy.name)
        self.stored[alert_policy.name] = monitoring_v3.AlertPolicy(alert_policy)
        return alert_policy


class FakeDashboards:
    """The three calls of ``DashboardsServiceClient`` that applying makes, with etags checked."""

    def __init__(self):
        self.stored = {}
        self.calls = []

    def list_dashboards(self, parent):
        assert monitoring_dashboard_v1.ListDashboardsRequest(parent=parent).parent == "projects/p"
        return list(self.stored.values())

    def create_dashboard(self, request):
        monitoring_dashboard_v1.CreateDashboardRequest(request)
        self.calls.append("create")
        created = monitoring_dashboard_v1.Dashboard(request["dashboard"])
        created.name, created.etag = f"{request['parent']}/dashboards/{len(self.stored) + 1}", "v1"
        self.stored[created.name] = created
        return created

    def update_dashboard(self, request):
        monitoring_dashboard_v1.UpdateDashboardRequest(request)
        self.calls.append("update")
        board = monitoring_dashboard_v1.Dashboard(request["dashboard"])
        if self.stored[board.name].etag != board.etag:
            raise exceptions.Aborted("etag mismatch")
        board.etag = f"v{int(board.etag[1:]) + 1}"
        self.stored[board.name] = board
        return board


def test_applying_twice_creates_once_then_updates_in_place():
    policies, boards = monitoring.alert_policies(), monitoring.dashboards()
    policy_client, board_client = FakeAlertPolicies(), FakeDashboards()
    first = monitoring.apply_policies(policy_client, "p", policies)
    first += monitoring.apply_dashboards(board_client, "p", boards)
    assert policy_client.calls == ["create"] * len(policies) and board_client.calls == ["create"] * len(boards)
    assert all(line.startswith("created ") for line in first)
    snapshot = {name: monitoring_v3.AlertPolicy.to_dict(p) for name, p in policy_client.stored.items()}

    second = monitoring.apply_policies(policy_client, "p", monitoring.alert_policies())
    second += monitoring.apply_dashboards(board_client, "p", monitoring.dashboards())
    assert len(policy_client.stored) == len(policies) and len(board_client.stored) == len(boards)
    assert all(line.startswith("updated ") for line in second)
    assert {name: monitoring_v3.AlertPolicy.to_dict(p) for name, p in policy_client.stored.items()} == snapshot
    assert all(not p.name for p in policies), "the generated policies themselves are left unnamed"


def test_a_policy_edited_by_hand_is_replaced_not_duplicated():
    [backlog, *rest] = monitoring.alert_policies(tiers=["high"])
    edited = monitoring_v3.AlertPolicy(backlog)
    edited.conditions[0].condition_threshold.threshold_value = 99999
    unrelated = monitoring_v3.AlertPolicy(display_name="Someone else's policy")
    client = FakeAlertPolicies(edited, unrelated)
    monitoring.apply_policies(client, "p", [backlog, *rest])
    same_name = [p for p in client.stored.values() if p.display_name == backlog.display_name]
    assert len(same_name) == 1
    assert (
        same_name[0].conditions[0].condition_threshold.threshold_value
        == backlog.conditions[0].condition_threshold.threshold_value
    )
    assert any(p.display_name == "Someone else's policy" for p in client.stored.values())


# The command.


def _without_credentials(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST")}
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    return {**env, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "HOME": str(tmp_path)}


def test_make_monitoring_dry_run_prints_json_without_credentials(tmp_path):
    # -o: the venv counts as installed (the test already runs in it), so make installs nothing.
    result = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "monitoring", "DRY_RUN=1", f"PY={sys.executable}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=_without_credentials(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout[result.stdout.index("{") :])
    assert len(document["alert_policies"]) == len(monitoring.alert_policies())
    assert len(document["dashboards"]) == len(monitoring.dashboards())


@pytest.mark.parametrize(
    "args, complaint",
    [
        ([], "--project is required to apply the policies (or print them with --dry_run)"),
        (["--project", "p"], "Cloud Monitoring needs Google credentials and there are none"),
        (["--dry_run", "--tier", "urgent"], "invalid choice: 'urgent'"),
    ],
)
def test_applying_needs_a_project_and_credentials(tmp_path, args, complaint):
    result = subprocess.run(
        [sys.executable, "-m", "tools.ops.monitoring", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=_without_credentials(tmp_path),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert error.startswith("python -m tools.ops.monitoring: error: ") and complaint in error
