"""Tar archives as streams of bytes: members read one by one from an async iterator of chunks
(image pushes), and members written as headers and padding (image exports).

Headers are parsed by the standard library (ustar, GNU and base-256 fields); PAX extended
headers and GNU long names, which Go's archive/tar writes for long paths, are applied here.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

from portside.errors import InvalidArgument

BLOCK = 512
EXTENDED_HEADER_MAX = 64 * 1024  # a PAX or GNU long-name header; names are far shorter
END_OF_ARCHIVE = bytes(2 * BLOCK)


@dataclass(frozen=True)
class Member:
    """One entry of an archive: a regular file's data follows it in the stream; a link names
    the member it stands for (normalised, relative to the archive's root)."""

    name: str
    size: int
    kind: str  # "file", "link" (symbolic or hard), "other" (directories, devices: skipped)
    target: str = ""


class ChunkReader:
    """Exact reads over an async iterator of byte chunks, without joining more than needed."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._ended = False
        self.consumed = 0  # bytes handed out so far

    async def _fill(self) -> bool:
        if self._ended:
            return False
        async for chunk in self._chunks:
            if chunk:
                self._buffer += chunk
                return True
        self._ended = True
        return False

    async def read_exact(self, n: int, what: str) -> bytes:
        while len(self._buffer) < n:
            if not await self._fill():
                raise InvalidArgument(
                    f"the archive ended after {self.consumed + len(self._buffer)} bytes, in the "
                    f"middle of {what}: not a whole `docker save` archive"
                )
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        self.consumed += n
        return out

    async def pieces(self, n: int, what: str) -> AsyncIterator[bytes]:
        """The next `n` bytes, in the pieces they arrived in (never all at once)."""
        left = n
        while left:
            if not self._buffer and not await self._fill():
                raise InvalidArgument(
                    f"the archive ended after {self.consumed} bytes, {left} bytes short of the "
                    f"end of {what}: not a whole `docker save` archive"
                )
            take = min(left, len(self._buffer))
            piece = bytes(self._buffer[:take])
            del self._buffer[:take]
            self.consumed += take
            left -= take
            yield piece

    async def skip(self, n: int, what: str) -> None:
        async for _ in self.pieces(n, what):
            pass

    async def drain(self) -> None:
        """Read and drop whatever is left (end-of-archive padding, or a push not needed)."""
        self._buffer.clear()
        while await self._fill():
            self._buffer.clear()


def padding(size: int) -> int:
    return -size % BLOCK


async def next_member(reader: ChunkReader) -> Member | None:
    """The next member's header (None at the end of the archive). For a "file" the caller reads
    exactly `size` bytes and then `skip_padding`; other members' data is consumed here."""
    long_name = ""
    long_link = ""
    pax: dict[str, str] = {}
    while True:
        block = await reader.read_exact(BLOCK, "a tar header")
        if block == bytes(BLOCK):
            return None
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise InvalidArgument(
                f"not a tar archive (bad header at byte {reader.consumed - BLOCK}: {exc}); "
                "push what `docker save` writes"
            ) from exc
        if info.type in (
            tarfile.XHDTYPE,
            tarfile.XGLTYPE,
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
        ):
            if not 0 <= info.size <= EXTENDED_HEADER_MAX:
                raise InvalidArgument(
                    f"not an image archive: an extended tar header of {info.size} bytes (at most "
                    f"{EXTENDED_HEADER_MAX} are taken)"
                )
            data = await reader.read_exact(info.size, "an extended tar header")
            await reader.skip(padding(info.size), "tar padding")
            if info.type == tarfile.XHDTYPE:
                pax.update(_pax_records(data))
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.type == tarfile.GNUTYPE_LONGLINK:
                long_link = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue  # a global header (XGLTYPE) carries nothing an image archive needs
        name = pax.get("path") or long_name or info.name
        link = pax.get("linkpath") or long_link or info.linkname
        size = _size(pax["size"]) if "size" in pax else info.size
        if size < 0:
            raise InvalidArgument(f"not a tar archive: member {name!r} has a negative size")
        name = _normal(name)
        if info.type in tarfile.REGULAR_TYPES:
            return Member(name, size, "file")
        if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            # A symbolic link is relative to its own folder, a hard link to the archive's root.
            base = posixpath.dirname(name) if info.type == tarfile.SYMTYPE else ""
            target = _normal(posixpath.join(base, link)) if not link.startswith("/") else link
            return Member(name, 0, "link", _normal(target))
        await reader.skip(size + padding(size), f"tar member {name}")
        return Member(name, size, "other")


def _size(text: str) -> int:
    if not text.isdigit():
        raise InvalidArgument(f"not a tar archive: a PAX size of {text[:40]!r}")
    return int(text)


def _normal(name: str) -> str:
    return posixpath.normpath(name.lstrip("/")).removeprefix("./")


def _pax_records(data: bytes) -> dict[str, str]:
    """PAX records: "<length> <key>=<value>\\n", one after another."""
    out: dict[str, str] = {}
    at = 0
    while at < len(data):
        space = data.find(b" ", at)
        if space < 0:
            break
        try:
            length = int(data[at:space])
        except ValueError as exc:
            raise InvalidArgument("not a tar archive (a malformed PAX header)") from exc
        if length <= 0:
            break
        record = data[space + 1 : at + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        at += length
    return out


def file_header(name: str, size: int, mtime: float = 0.0) -> bytes:
    """The header of a regular file `name` of `size` bytes (its data and `padding` follow)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(mtime)
    return info.tobuf(format=tarfile.PAX_FORMAT)
