"""A zip's member count, read from its end-of-central-directory record without parsing its
directory, and the refusal of a model archive that declares too many members.

`evaluator.models.loading` calls `check_member_count` on every zip it is given before
``zipfile`` reads the directory; `evaluator.models.pt2` calls it on torch.export archives.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from evaluator.errors import ModelFormatError
from evaluator.models.pt2_rules import HOW_TO_EXPORT

__all__ = ["MAX_ARCHIVE_MEMBERS", "check_member_count", "count_zip_members"]

StrPath = str | os.PathLike[str]


# A real archive has one member per weight storage plus a handful; a ResNet-152 has under 1,000.
MAX_ARCHIVE_MEMBERS = 10_000

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_EOCD_SIZE = 22
_MAX_COMMENT = 0xFFFF


def count_zip_members(path: StrPath) -> int | None:
    """The member count a zip declares in its end-of-central-directory record, or None.

    Reads at most the last 64 KiB (plus the zip64 record when the count does not fit in 16
    bits), so a zip with millions of members is counted without parsing its directory. None
    means no end record was found: not a zip, or a truncated one.
    """
    with Path(path).open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        tail_start = max(0, size - _EOCD_SIZE - _MAX_COMMENT)
        f.seek(tail_start)
        tail = f.read()
        at = _end_record(tail)
        if at is None:
            return None
        (count,) = struct.unpack_from("<H", tail, at + 10)
        if count != 0xFFFF:
            return int(count)
        locator_at = tail_start + at - 20
        if locator_at < 0:
            return int(count)
        f.seek(locator_at)
        locator = f.read(20)
        if locator[:4] != _EOCD64_LOCATOR:
            return int(count)
        (record_at,) = struct.unpack_from("<Q", locator, 8)
        if record_at + 56 > size:
            return None
        f.seek(record_at)
        record = f.read(56)
        if record[:4] != _EOCD64:
            return None
        (count64,) = struct.unpack_from("<Q", record, 32)
        return int(count64)


def _end_record(tail: bytes) -> int | None:
    """Where the end record starts in ``tail``: the last signature whose comment length
    reaches exactly the end of the file (the comment itself may contain the signature)."""
    at = tail.rfind(_EOCD)
    while at >= 0:
        if len(tail) - at >= _EOCD_SIZE:
            (comment,) = struct.unpack_from("<H", tail, at + 20)
            if at + _EOCD_SIZE + comment == len(tail):
                return at
        at = tail.rfind(_EOCD, 0, at)
    return None


def check_member_count(path: StrPath, what: str = "zip archive") -> None:
    """Refuse a zip that declares more than ``MAX_ARCHIVE_MEMBERS`` members, before parsing it."""
    count = count_zip_members(path)
    if count is not None and count > MAX_ARCHIVE_MEMBERS:
        raise ModelFormatError(
            f"The {what} declares {count} members, more than the {MAX_ARCHIVE_MEMBERS} a model "
            f"archive may hold; it was refused without being unpacked. {HOW_TO_EXPORT}"
        )
