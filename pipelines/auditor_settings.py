"""The auditor's flags and settings: its own options beside the shared ``HourOptions``, resolved
per type, with the tier for what is left unset, into the ``AuditSettings`` its steps take."""

from __future__ import annotations

import dataclasses

from apache_beam.options.pipeline_options import PipelineOptions

from event_delivery.contract import counts, partitions
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import TIERS, EventType, get_event_type, load_registry
from pipelines.flags import HourOptions

ALL_TYPES = "all"


class AuditorOptions(PipelineOptions):
    """The auditor's own flags; those it shares with the delivery family are ``HourOptions``,
    so that the two jobs of a type are configured alike."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_auditor_arguments(parser)


def add_auditor_arguments(parser) -> None:
    group = parser.add_argument_group("auditor")
    group.add_argument(
        "--event_types",
        help="Several types in one job, comma-separated, or 'all': a local run audits every type in one process.",
    )
    group.add_argument(
        "--audit_source",
        choices=counts.SOURCES,
        help="Where the counts come from. Default: the type's tier ("
        + ", ".join(f"{t.name} {t.audit_source}" for t in TIERS.values())
        + ").",
    )
    group.add_argument(
        "--check_delay_seconds",
        type=int,
        help="How long after writing an hour's counts they are checked against delivery's output "
        "(the audit/lost counter). Default: the tier's close margin.",
    )


@dataclasses.dataclass(frozen=True)
class AuditSettings:
    """Everything one type's branch of the auditor needs, resolved and checked once."""

    event_type: EventType
    layout: Layout
    source: str
    allowed_lateness_seconds: int
    check_delay_seconds: int
    trigger_seconds: int = 60
    late_horizon_seconds: int = counts.LATE_HORIZON_SECONDS
    max_future_seconds: int = counts.MAX_FUTURE_SECONDS

    def __post_init__(self):
        partitions.check_window_seconds(self.window_seconds)
        if self.layout.audit is None:
            raise ValueError("the auditor needs a layout with an audit root (Layout.under a storage root)")
        if self.source not in counts.SOURCES:
            raise ValueError(f"audit source must be one of {', '.join(counts.SOURCES)}")
        for name in ("allowed_lateness_seconds", "check_delay_seconds", "late_horizon_seconds", "max_future_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.trigger_seconds <= 0:
            raise ValueError("trigger_seconds must be positive")

    @property
    def window_seconds(self) -> int:
        return self.layout.window_seconds

    def subscription(self, project: str) -> str:
        return f"projects/{project}/subscriptions/{counts.auditor_subscription(self.event_type, self.source)}"


def auditor_settings(options: PipelineOptions) -> list[AuditSettings]:
    """One ``AuditSettings`` per type named by the options (any view); raises ``ValueError`` or ``KeyError``."""
    shared, own = options.view_as(HourOptions), options.view_as(AuditorOptions)
    names = [shared.event_type] if shared.event_type else []
    if own.event_types:
        listed = [name.strip() for name in own.event_types.split(",") if name.strip()]
        names += sorted(load_registry()) if listed == [ALL_TYPES] else listed
    if not names:
        raise ValueError("--event_type or --event_types is required")
    if not shared.storage_root:
        raise ValueError("--storage_root is required")
    settings = []
    for name in dict.fromkeys(names):
        event_type = get_event_type(name)
        tier, lateness, delay = event_type.tier, shared.allowed_lateness_seconds, own.check_delay_seconds
        settings.append(
            AuditSettings(
                event_type,
                Layout.under(shared.storage_root, name, shared.window_seconds),
                source=own.audit_source or tier.audit_source,
                allowed_lateness_seconds=tier.allowed_lateness_seconds if lateness is None else lateness,
                check_delay_seconds=tier.close_margin_seconds if delay is None else delay,
                trigger_seconds=shared.trigger_seconds,
                late_horizon_seconds=shared.late_horizon_seconds,
                max_future_seconds=shared.max_future_seconds,
            )
        )
    return settings
