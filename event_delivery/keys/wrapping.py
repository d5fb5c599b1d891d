"""The key-wrapping keys: their names, generations, and which one wraps a new key.

The KEK wraps only key-wrapping keys, one per calendar month (UTC): the named key
``key-wrapping/<YYYY-MM>``. A rotation replaces each by a newer generation of its month,
``key-wrapping/<YYYY-MM>/<n>``, re-wraps every data key under it and deletes the old one;
the newest generation of the month is the one new keys are wrapped under. Keys are stored
only while the key-wrapping key that wrapped them is still the newest of its month, so no
key is ever stored under one a rotation is about to delete (``KeyWrappingReplaced``).
"""

from __future__ import annotations

import time
from typing import NamedTuple

KEY_WRAPPING_KEYS = "key-wrapping/"
WRAPPED_LOCALLY = 2  # the format byte of a key wrapped by a key-wrapping key
KEY_ID_BYTES = 16


class KeyWrappingReplaced(Exception):
    """A rotation made a newer key-wrapping key while new keys were being wrapped under the old
    one: they were not stored, and are wrapped again under the newer one. Raised out of the
    keystore only when rotations replaced it at every attempt: it passes (a transient error)."""


class KeyWrapping(NamedTuple):
    """The key-wrapping key that wraps a process's new keys: its month, and its key id."""

    period: str
    key_id: str

    @property
    def names(self) -> str:
        """The prefix of every generation's name of its month."""
        return KEY_WRAPPING_KEYS + self.period

    def is_newest(self, names: dict[str, str]) -> bool:
        """Whether it is still the newest generation among its month's ``names`` (name -> key id)."""
        newest = newest_generation(names)
        return newest is not None and newest[1] == self.key_id


class NewKey(NamedTuple):
    """A key made but not stored yet, and the key-wrapping key that wrapped it (None: the KEK did)."""

    key_id: str
    wrapped: bytes
    wrapping: KeyWrapping | None = None


def key_wrapping_period(now: float) -> str:
    """The calendar month (UTC) whose key-wrapping key wraps the keys made at ``now``."""
    return time.strftime("%Y-%m", time.gmtime(now))


def generation_of(name: str) -> tuple[str, int]:
    """``(month, generation)`` of a key-wrapping key's name; the first of a month is generation 0."""
    period, _, generation = name.removeprefix(KEY_WRAPPING_KEYS).partition("/")
    return period, int(generation or 0)


def generation_name(period: str, generation: int) -> str:
    return KEY_WRAPPING_KEYS + period + (f"/{generation}" if generation else "")


def newest_generation(names: dict[str, str]) -> tuple[str, str] | None:
    """``(name, key id)`` of the newest generation among one month's ``names``, or None."""
    if not names:
        return None
    name = max(names, key=lambda n: generation_of(n)[1])
    return name, names[name]


def wrapping_key_id_of(wrapped: bytes) -> str | None:
    """The id of the key-wrapping key that wrapped a stored key, or None if the KEK did."""
    if wrapped[:1] != bytes([WRAPPED_LOCALLY]) or len(wrapped) < 1 + KEY_ID_BYTES:
        return None
    return wrapped[1 : 1 + KEY_ID_BYTES].hex()


def check_still_newest(keys, read_names) -> None:
    """Raises ``KeyWrappingReplaced`` unless every key-wrapping key that wrapped ``keys`` (``NewKey``)
    is the newest of its month in ``read_names(prefix)``, the backend's view at the moment it stores."""
    for wrapping in {key.wrapping for key in keys} - {None}:
        if not wrapping.is_newest(read_names(wrapping.names)):
            raise KeyWrappingReplaced(f"the key-wrapping key {wrapping.key_id} was replaced by a rotation")
