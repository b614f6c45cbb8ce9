"""The sync's wire protocol: what goes down the chain (stdin of each receiver) and what comes back.

Down: one JSON line with the manifest, then per file a `FileHeader` line followed by
`size - start` raw bytes, then an `End` line. Up (stdout of each receiver): one JSON line per
event — `Plan`, `Progress`, `Result` — each naming its node; a receiver passes on the events of
the nodes after it unchanged.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from node_runtime.modelstore.manifest import ManifestError

# Bytes read from a file or the stream at a time; a relay forwards each read at once.
CHUNK_BYTES = 1 << 20


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def line(self) -> bytes:
        return self.model_dump_json().encode() + b"\n"


class FileHeader(Message):
    """The next `size - start` bytes on the stream are `path` from offset `start`, wanted by the nodes in `to`."""

    path: str
    size: int = Field(ge=0)
    start: int = Field(ge=0)
    to: list[str]

    @field_validator("path")
    @classmethod
    def _inside_the_model(cls, path: str) -> str:
        if PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
            raise ValueError(f"refusing unsafe path {path!r} in the stream")
        return path


class End(Message):
    end: Literal[True] = True


class Plan(Message):
    """A node's answer to the manifest: the files it lacks, each with the bytes it already holds."""

    node: str
    event: Literal["plan"] = "plan"
    needs: dict[str, int]
    up_to_date: bool


class Progress(Message):
    node: str
    event: Literal["progress"] = "progress"
    bytes: int


class Result(Message):
    node: str
    event: Literal["result"] = "result"
    ok: bool
    bytes: int = 0
    message: str


Event = Union[Plan, Progress, Result]
_stream_line = TypeAdapter(Union[FileHeader, End])
_event = TypeAdapter(Annotated[Event, Field(discriminator="event")])


def parse_stream_line(line: bytes) -> FileHeader | End:
    try:
        return _stream_line.validate_json(line)
    except ValidationError as invalid:
        first = invalid.errors()[0]
        raise ManifestError(str(first.get("ctx", {}).get("error") or f"bad line in the stream: {first['msg']}")) from None


def parse_event(line: bytes) -> Event | None:
    """The event on this line, or None for anything else (an event line is all we trust on stdout)."""
    try:
        return _event.validate_json(line)
    except ValidationError:
        return None
