"""Alerts and dashboards as code: Cloud Monitoring alert policies and one dashboard per tier.

    python -m tools.ops.monitoring --dry_run                   # print them as JSON
    python -m tools.ops.monitoring --project my-project        # create or update them
    python -m tools.ops.monitoring --project my-project --tier high \\
        --notification_channel projects/my-project/notificationChannels/123

Everything derives from the registry: a tier's policies watch the subscriptions and jobs
of its types, with the thresholds of ``event_delivery.contract.slo``. For each tier:

- **backlog**: the oldest unacked message on a delivery subscription or an auditor's;
- **lag**: the job's data watermark age or system lag;
- **dead-letter rate**: dead-lettered / in over the last hour, per job;
- **hours overdue**: an hour's marker written after its close deadline;
- **not running**: a failed job, or a job that stopped reporting;

and, for every tier alike (lost = 0 is every tier's objective), **data lost**: an auditor
found messages that are in no output. Each policy's documentation names its section of
the runbook (``docs/operations.md``).

Applying is idempotent: a policy or dashboard with the same display name is updated in
place, never duplicated. The printed JSON is the REST form of ``AlertPolicy`` and
``Dashboard``, which ``gcloud monitoring policies create --policy-from-file`` and
``gcloud monitoring dashboards create --config-from-file`` also read.

The policies are ``tools.ops.alerts``, the dashboards ``tools.ops.dashboards``,
and what both select ``tools.ops.monitoring_queries``; this module applies them.
"""

from __future__ import annotations

import argparse
import json
import sys

from event_delivery.cloud import preflight
from tools.ops.alerts import alert_policies
from tools.ops.dashboards import dashboards
from tools.ops.monitoring_queries import ordered_tiers

PROG = "python -m tools.ops.monitoring"


def as_json(message) -> dict:
    """A policy or dashboard in its REST form (camelCase, enum names), as gcloud reads it."""
    return json.loads(
        type(message).to_json(message, use_integers_for_enums=False, always_print_fields_with_no_presence=False)
    )


def apply_policies(client, project: str, policies) -> list[str]:
    """Creates each policy, or updates the one with its display name; returns what it did."""
    parent = f"projects/{project}"
    existing: dict[str, list] = {}
    for found in client.list_alert_policies(name=parent):
        existing.setdefault(found.display_name, []).append(found)
    done = []
    for policy in policies:
        same_name = existing.get(policy.display_name, [])
        if same_name:
            policy = type(policy)(policy)
            policy.name = same_name[0].name
            client.update_alert_policy(alert_policy=policy)
            done.append(f"updated alert policy {policy.display_name!r}")
            if len(same_name) > 1:
                others = ", ".join(p.name for p in same_name[1:])
                done.append(f"  note: {len(same_name) - 1} more with that name, left as they are: {others}")
        else:
            created = client.create_alert_policy(name=parent, alert_policy=policy)
            done.append(f"created alert policy {policy.display_name!r} ({created.name})")
    return done


def apply_dashboards(client, project: str, boards) -> list[str]:
    """Creates each dashboard, or updates the one with its display name; returns what it did."""
    parent = f"projects/{project}"
    existing = {}
    for found in client.list_dashboards(parent=parent):
        existing.setdefault(found.display_name, found)
    done = []
    for board in boards:
        found = existing.get(board.display_name)
        if found is not None:
            board = type(board)(board)
            board.name, board.etag = found.name, found.etag
            client.update_dashboard(request={"dashboard": board})
            done.append(f"updated dashboard {board.display_name!r}")
        else:
            created = client.create_dashboard(request={"parent": parent, "dashboard": board})
            done.append(f"created dashboard {board.display_name!r} ({created.name})")
    return done


def _clients():
    from google.cloud import monitoring_dashboard_v1, monitoring_v3

    return monitoring_v3.AlertPolicyServiceClient(), monitoring_dashboard_v1.DashboardsServiceClient()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--project", help="The project whose Cloud Monitoring gets them; required unless --dry_run.")
    parser.add_argument(
        "--tier",
        action="append",
        choices=ordered_tiers(),
        help="Only this tier's policies and dashboard (repeatable; default: every tier). Data lost is always included.",
    )
    parser.add_argument(
        "--notification_channel",
        action="append",
        default=[],
        help="A notification channel every policy notifies: projects/<project>/notificationChannels/<id> (repeatable).",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="Print the policies and dashboards as one JSON document instead; needs no project and no credentials.",
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not args.project:
        parser.error("--project is required to apply the policies (or print them with --dry_run)")
    policies = alert_policies(args.tier, args.notification_channel)
    boards = dashboards(args.tier)
    if args.dry_run:
        document = {"alert_policies": [as_json(p) for p in policies], "dashboards": [as_json(d) for d in boards]}
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from google.api_core import exceptions
    from google.auth import exceptions as auth_exceptions

    with preflight.exit_on_failure(PROG):
        preflight.check_credentials(None, "Cloud Monitoring")
    try:
        alert_client, dashboard_client = _clients()
        done = apply_policies(alert_client, args.project, policies)
        done += apply_dashboards(dashboard_client, args.project, boards)
    except (exceptions.GoogleAPICallError, exceptions.RetryError, auth_exceptions.GoogleAuthError) as error:
        preflight.fail(PROG, f"Cloud Monitoring in project {args.project}: {getattr(error, 'message', error)}")
    print("\n".join(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
