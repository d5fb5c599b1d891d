"""The delivery job's Flex Template metadata: its name, description and parameters.

Every parameter is a flag of ``DeliveryOptions`` or of the ``HourOptions`` it shares with the
auditor, with that flag's own help text, so the template's launch form says what ``--help``
says; a flag added to the options is in the next template. The event types come from the
registry. Dataflow checks a parameter's value against its regexes before it launches.
"""

from __future__ import annotations

import argparse

from event_delivery.contract.registry import load_registry

NAME = "Event Delivery: one event type"
REQUIRED = {"event_type"}  # the one flag a delivery job cannot run without
_NUMBER_PATTERNS = {int: r"^-?[0-9]+$", float: r"^[0-9]+(\.[0-9]+)?$"}


def delivery_flags() -> list[argparse.Action]:
    """The flags of the delivery job's options classes, in the order its ``--help`` lists them."""
    from pipelines.flags import HourOptions
    from pipelines.options import DeliveryOptions

    parser = argparse.ArgumentParser(add_help=False)
    HourOptions._add_argparse_args(parser)
    DeliveryOptions._add_argparse_args(parser)
    return [action for action in parser._actions if action.option_strings]


def parameter(action: argparse.Action) -> dict:
    """One flag as a template parameter (``name``, ``label``, ``helpText``, ``isOptional``, ``regexes``)."""
    entry = {
        "name": action.dest,
        "label": action.dest.replace("_", " ").capitalize(),
        "helpText": action.help,
        "isOptional": action.dest not in REQUIRED,
    }
    if action.choices:
        entry["regexes"] = ["^(" + "|".join(sorted(action.choices)) + ")$"]
    elif action.type in _NUMBER_PATTERNS:
        entry["regexes"] = [_NUMBER_PATTERNS[action.type]]
    return entry


def template_metadata() -> dict:
    """The metadata file ``gcloud dataflow flex-template build --metadata-file`` takes."""
    registry = load_registry()
    types = ", ".join(f"{name} ({t.tier.name})" for name, t in sorted(registry.items()))
    return {
        "name": NAME,
        "description": "Delivers one event type's Pub/Sub subscription into hourly, deduplicated Avro "
        f"partitions on Cloud Storage, personal fields encrypted. Types (tier): {types}.",
        "streaming": True,
        "parameters": [parameter(action) for action in delivery_flags()],
    }
