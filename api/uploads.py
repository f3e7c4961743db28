"""Streaming multipart uploads: the ``file`` part goes straight to storage, chunk by chunk.

Nothing is spooled to memory or to a temporary file first: the request body is parsed as it
arrives (``python_multipart``) and the file's bytes are handed to :meth:`Storage.aput_stream`,
which enforces the size limit while writing.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from api.errors import InvalidRequest
from core.errors import PayloadTooLarge
from core.storage import Blob, Storage

MAX_FIELD_BYTES = 64 * 1024
# The form around the file: its text fields, and every part's headers, counted as they arrive
# and refused at once when over, so that a flood of fields never accumulates in memory.
MAX_FORM_FIELDS = 16
MAX_FORM_BYTES = 256 * 1024
MAX_PART_HEADER_BYTES = 8 * 1024
FORM_OVERHEAD = (
    1024 * 1024
)  # allowance for boundaries and small fields when checking Content-Length


@dataclass
class Upload:
    """A stored file part and the form's other (text) fields."""

    blob: Blob
    filename: str
    fields: dict[str, str] = field(default_factory=dict)


def safe_suffix(filename: str) -> str:
    """The file's extension if it is short and plain (kept on the storage key), else ''."""
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,10}", suffix) else ""


def multipart_boundary(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "")
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "send the file as multipart/form-data with a 'file' field (curl -F file=@model.pt2 …)",
            field="file",
        )
    return boundary


class _FormReader:
    """Feeds body chunks to the parser; yields the file's bytes, keeps the small fields."""

    def __init__(self, boundary: bytes, file_field: str) -> None:
        self.file_field = file_field
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_done = False
        self._pending: deque[bytes] = deque()
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()
        self._parts = 0
        self._form_bytes = 0
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
        )

    def _part_begin(self) -> None:
        self._headers, self._name, self._is_file = {}, None, False
        self._value = bytearray()
        self._parts += 1
        if self._parts > MAX_FORM_FIELDS + 1:  # the file and the text fields
            raise InvalidRequest(
                f"the form has more than {MAX_FORM_FIELDS + 1} fields; send the file and only "
                "the fields this route takes",
                details={"max_fields": MAX_FORM_FIELDS + 1},
            )

    def _count(self, size: int) -> None:
        """Count bytes of the form around the file (headers, text fields) against the cap."""
        self._form_bytes += size
        if self._form_bytes > MAX_FORM_BYTES:
            raise PayloadTooLarge(
                f"the form's fields and part headers hold more than {MAX_FORM_BYTES} bytes; send "
                "the file and only the fields this route takes",
                details={"max_form_bytes": MAX_FORM_BYTES},
            )

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._header_value += data[start:end]
        if len(self._header_value) > MAX_PART_HEADER_BYTES:
            raise InvalidRequest(
                f"a part header of the form is longer than {MAX_PART_HEADER_BYTES} bytes",
                field=self.file_field,
            )

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if "\x00" in self._name:
            raise InvalidRequest("a form field's name contains a NUL character", field="")
        if self._name != self.file_field and b"filename" in options and self.filename is None:
            # A file under another name (curl -F data=@…): say which field we expected.
            raise InvalidRequest(
                f"the form has no '{self.file_field}' field: the file came in field "
                f"'{self._name}'; send it as '{self.file_field}' "
                f"(curl -F {self.file_field}=@FILE …)",
                field=self.file_field,
                details={"received": self._name},
            )
        if self._name == self.file_field:
            if self.filename is not None:
                raise InvalidRequest("send one 'file' field, not several", field="file")
            self._is_file = True
            self.filename = options.get(b"filename", b"upload").decode("utf-8", "replace")
            if "\x00" in self.filename:
                raise InvalidRequest(
                    "the file's name contains a NUL character; rename it", field=self.file_field
                )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self._pending.append(bytes(data[start:end]))
            return
        self._count(end - start)
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise InvalidRequest(
                f"form field '{self._name}' is longer than {MAX_FIELD_BYTES} bytes; a file goes "
                f"in field '{self.file_field}' (curl -F {self.file_field}=@FILE …)",
                field=self._name or "",
            )

    def _part_end(self) -> None:
        if self._is_file:
            self.file_done = True
        elif self._name:
            value = self._value.decode("utf-8", "replace")
            if "\x00" in value:  # no column or file name may hold one (PostgreSQL refuses it)
                raise InvalidRequest(
                    f"form field '{self._name}' contains a NUL character; remove it",
                    field=self._name,
                )
            self.fields[self._name] = value

    async def file_chunks(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Parse the body; yield the file part's bytes as they arrive; read to the end."""
        try:
            async for chunk in body:
                self.parser.write(chunk)
                while self._pending:
                    yield self._pending.popleft()
            self.parser.finalize()
        except MultipartParseError as exc:
            raise InvalidRequest(
                f"the multipart body is malformed ({exc}); send it as multipart/form-data",
                field=self.file_field,
            ) from None
        while self._pending:
            yield self._pending.popleft()


async def receive_upload(
    request: Request, storage: Storage, key_stem: str, *, max_bytes: int, file_field: str = "file"
) -> Upload:
    """Stream a multipart form's file into storage under ``key_stem`` + the file's extension.

    The other fields may come before or after the file. PayloadTooLarge when the file passes
    ``max_bytes`` (nothing is left in storage); InvalidRequest when there is no file part.
    """
    boundary = multipart_boundary(request)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes + FORM_OVERHEAD:
        raise PayloadTooLarge(
            f"the upload is larger than the limit of {max_bytes} bytes; send a smaller file "
            "or raise DISTILL_MAX_UPLOAD_BYTES",
            details={"max_bytes": max_bytes},
        )
    reader = _FormReader(boundary, file_field)
    body = request.stream()
    chunks = reader.file_chunks(body)

    # The key needs the file's extension, known only once the file part's headers are parsed.
    first: bytes | None = None
    async for piece in chunks:
        first = piece
        break
    if reader.filename is None:
        received = ", ".join(f"'{name}'" for name in reader.fields) or "none"
        raise InvalidRequest(
            f"the form has no '{file_field}' field (fields received: {received}); send the file "
            f"as multipart field '{file_field}' (curl -F {file_field}=@FILE …)",
            field=file_field,
            details={"received": list(reader.fields)},
        )
    key = key_stem + safe_suffix(reader.filename)

    async def rest() -> AsyncIterator[bytes]:
        if first is not None:
            yield first
        async for piece in chunks:
            yield piece

    blob = await storage.aput_stream(key, rest(), max_bytes=max_bytes)
    if not reader.file_done:
        storage.delete(key)
        raise InvalidRequest("the upload ended before the file did; send it again", field="file")
    return Upload(blob=blob, filename=reader.filename, fields=reader.fields)
