"""The export formats: the one definition every layer checks against. No third-party imports (the CLI reads it).

A member's value ("adapter") is how the export worker's spec, the artifact manifest, the client and the CLI spell
it; its name ("ADAPTER") is the contract's `EXPORT_FORMAT_ADAPTER` without the prefix, which the artifact record
stores and the artifact id is derived from. api/convert.py maps the contract's enum to it and back.
"""

from __future__ import annotations

from enum import StrEnum

from finetune_server.errors import ErrorKind, FinetuneError


class ExportFormat(StrEnum):
    ADAPTER = "adapter"  # the PEFT adapter folder
    MERGED = "merged"  # the adapter folded into 16-bit base weights

    @classmethod
    def parse(cls, value: str) -> ExportFormat:
        """The member whose value is `value`; INVALID_ARGUMENT EXPORT_FORMAT for anything else."""
        try:
            return cls(value)
        except ValueError:
            raise FinetuneError(
                ErrorKind.INVALID_ARGUMENT,
                "EXPORT_FORMAT",
                f"unknown export format {value!r}: use one of {', '.join(FORMATS)}",
            ) from None


FORMATS = tuple(f.value for f in ExportFormat)  # the values, for membership checks and messages
