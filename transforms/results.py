"""What a step that can fail returns: its output, and its failures as data.

No step fails a bundle for good on an element's account: what it cannot handle leaves it
as a dead letter, ``(event_id or "", received_at_millis, dead_letter_record)``, unsealed,
in the global window, for ``SealDeadLetters``. The delivery path flattens every step's
``dead_letters`` into the one dead-letter sink. Each result is a ``NamedTuple`` of
``PCollection``s, which Beam takes as a composite's output, its fields the output tags.
"""

from __future__ import annotations

from typing import NamedTuple

from apache_beam import PCollection


class Result(NamedTuple):
    """A step's ``output`` and its ``dead_letters``."""

    output: PCollection
    dead_letters: PCollection


class ParsedMessages(NamedTuple):
    """``ParseEvents``' events (``output``) and ``dead_letters``, as a ``Result``'s, and the
    ``raw_messages`` for the raw archive (empty unless it keeps them)."""

    output: PCollection
    dead_letters: PCollection
    raw_messages: PCollection
