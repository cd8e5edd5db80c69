"""Read rows of the outbox's ``readings`` table straight from a damaged SQLite file and its WAL.

SQLite refuses a whole file whose header is garbage and stops at the first damaged page, yet the
rows on every other page are still on the disk. This module reads the file format itself
(https://sqlite.org/fileformat2.html): every table-leaf page (type 0x0D) of the database file and
of the WAL (frames are a 24-byte header + one page; for a page number the later frame wins), every
cell's record (varints, serial types), overflow chains. A row is recognised as a ``readings`` row
by its column count and column types. On a page whose header or cell pointers are damaged, cells
are carved byte by byte and kept only when their payload checksum matches. Everything is
bounds-checked: on arbitrary bytes the scanner finds nothing and never raises or loops.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SQLITE_MAGIC = b"SQLite format 3\x00"
_WAL_MAGIC_LE, _WAL_MAGIC_BE = 0x377F0682, 0x377F0683
_WAL_HEADER, _FRAME_HEADER = 32, 24
_DEFAULT_PAGE_SIZE = 4096
_MAX_OVERFLOW_PAGES = 4096  # a reading is a few KiB; a longer chain is a loop or garbage

# Column types of a readings row, by schema version: 11 columns (v1) or 15 (v2). "i" is the
# INTEGER PRIMARY KEY alias (stored as NULL, the value is the cell's rowid), "t" text, "b" blob,
# "v" the 0/1 valid flag, a trailing "?" allows NULL.
_V1_TYPES = ("i", "t", "t", "b", "t", "t", "t", "t", "v", "t", "t?")
_V2_TYPES = (*_V1_TYPES[:4], "t?", *_V1_TYPES[5:], "t?", "t?", "t?", "t?")

Value = int | float | str | bytes | None


@dataclass(frozen=True, slots=True)
class RawRow:
    """One version of a readings row found on a page: columns after seq, as SQLite stored them."""

    seq: int
    values: tuple[Value, ...]  # 10 (v1) or 14 (v2) columns: reading_id .. retry_at
    order: int  # which version is newer: the WAL frame index, or -1 for the database file


@dataclass(slots=True)
class ScanResult:
    """Every version of every readings row found, and the seqs of cells that did not decode."""

    rows: dict[int, list[RawRow]] = field(default_factory=dict)
    undecodable: set[int] = field(default_factory=set)

    @property
    def max_seq(self) -> int:
        """The highest seq seen in any readings cell (0 if none)."""
        return max((*self.rows, *self.undecodable), default=0)


class _Bad(Exception):
    """A structure runs out of bounds or makes no sense: skip it."""


def _varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        if pos + i >= end:
            raise _Bad
        byte = buf[pos + i]
        if i == 8:
            return (value << 8) | byte, pos + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos + i + 1
    raise _Bad  # pragma: no cover (the loop always returns or raises)


_INT_SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def _serial_size(t: int) -> int:
    if t in _INT_SIZES:
        return _INT_SIZES[t]
    if t == 7:
        return 8
    if t in (0, 8, 9):
        return 0
    if t >= 12:
        return (t - 12) // 2 if t % 2 == 0 else (t - 13) // 2
    raise _Bad  # 10, 11: reserved


def _value(t: int, data: bytes) -> Value:
    if t == 0:
        return None
    if t in _INT_SIZES:
        return int.from_bytes(data, "big", signed=True)
    if t == 7:
        return float(struct.unpack(">d", data)[0])
    if t in (8, 9):
        return t - 8
    if t % 2 == 0:
        return bytes(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad from None


def _type_fits(kind: str, t: int) -> bool:
    if kind.endswith("?") and t == 0:
        return True
    kind = kind.rstrip("?")
    if kind == "i":
        return t == 0
    if kind == "t":
        return t >= 13 and t % 2 == 1
    if kind == "b":
        return t >= 12 and t % 2 == 0
    return t in (8, 9, 1)  # valid: 0/1 (schema format 4 stores them as 8/9)


def readings_shape(types: list[int]) -> bool:
    """Whether a record's serial types are those of a readings row (v1 or v2)."""
    for shape in (_V1_TYPES, _V2_TYPES):
        if len(types) == len(shape) and all(_type_fits(k, t) for k, t in zip(shape, types, strict=True)):
            return True
    return False


class _Pages:
    """The database's pages as the newest copy found: a WAL frame if any, else the file."""

    def __init__(self, db: bytes | mmap.mmap, wal: bytes | mmap.mmap) -> None:
        self.db = db
        self.wal = wal
        header_ok = len(db) >= 100 and db[:16] == SQLITE_MAGIC
        self.page_size = _page_size(db[16:18]) if header_ok else None
        self.reserved = db[20] if header_ok else 0
        # page number -> [(offset, frame index)], oldest first: every copy is read, so a row
        # survives the damage of its page's newest frame if an older frame still holds it.
        self.wal_frames: dict[int, list[tuple[int, int]]] = {}
        wal_page_size = self._index_wal()
        if self.page_size is None:
            self.page_size = wal_page_size or _guess_page_size(db)
        if self.reserved >= self.page_size - 480:
            self.reserved = 0

    def _index_wal(self) -> int | None:
        wal = self.wal
        if len(wal) < _WAL_HEADER:
            return None
        magic, _version, size = struct.unpack(">III", wal[:12])
        header_ok = magic in (_WAL_MAGIC_LE, _WAL_MAGIC_BE) and _page_size_ok(size)
        page_size = size if header_ok else (self.page_size or _DEFAULT_PAGE_SIZE)
        frame_len = _FRAME_HEADER + page_size
        count = (len(wal) - _WAL_HEADER) // frame_len
        salts = [bytes(wal[_WAL_HEADER + i * frame_len + 8 : _WAL_HEADER + i * frame_len + 16])
                 for i in range(count)]  # fmt: skip
        # The current generation's frames carry the header's salts; frames left over from an
        # older generation (already checkpointed) carry older ones. With a garbage header,
        # the most common salt pair is the best guess at the current generation.
        if header_ok:
            current = bytes(wal[16:24])
        elif salts:
            current = Counter(salts).most_common(1)[0][0]
        else:
            return None
        for i, salt in enumerate(salts):
            if salt != current:
                continue
            off = _WAL_HEADER + i * frame_len
            page_no = int.from_bytes(wal[off : off + 4], "big")
            if page_no >= 1:
                self.wal_frames.setdefault(page_no, []).append((off + _FRAME_HEADER, i))
        return page_size if header_ok else None

    def numbers(self) -> Iterator[int]:
        """Every page number that has a copy in the file or the WAL."""
        assert self.page_size is not None
        in_file = (len(self.db) + self.page_size - 1) // self.page_size
        yield from sorted(set(range(1, in_file + 1)) | set(self.wal_frames))

    def copies(self, page_no: int) -> Iterator[tuple[bytes | memoryview, int]]:
        """The page's copies, newest first (later WAL frames win): (bytes, order)."""
        assert self.page_size is not None
        for off, index in reversed(self.wal_frames.get(page_no, [])):
            yield memoryview(self.wal)[off : off + self.page_size], index
        off = (page_no - 1) * self.page_size
        if off < len(self.db):
            yield memoryview(self.db)[off : off + self.page_size], -1

    def newest(self, page_no: int) -> bytes | memoryview | None:
        """The newest copy of a page (for overflow chains), or None."""
        return next((page for page, _ in self.copies(page_no)), None)


def _page_size(raw: bytes) -> int | None:
    size = int.from_bytes(raw, "big")
    size = 65536 if size == 1 else size
    return size if _page_size_ok(size) else None


def _page_size_ok(size: int) -> bool:
    return 512 <= size <= 65536 and size & (size - 1) == 0


def _guess_page_size(db: bytes | mmap.mmap) -> int:
    """The page size under which the most pages (after the first) start like b-tree pages.

    For a file whose header is damaged and that has no WAL to say it: new outboxes use 2 KiB
    pages, older ones 4 KiB. A size too large skips real pages, a size too small lands in
    mid-page bytes: each wrong start costs a point, each b-tree page type gains one.
    """
    best, best_score = _DEFAULT_PAGE_SIZE, 0
    for size in (4096, 2048, 1024, 8192, 16384, 32768, 65536, 512):
        starts = range(size, len(db) - 8, size)
        if not starts:
            continue
        good = sum(db[at] in _BTREE_PAGE_TYPES for at in starts)
        score = 2 * good - len(starts)
        if score > best_score:
            best, best_score = size, score
    return best


def scan(db: bytes | mmap.mmap, wal: bytes | mmap.mmap = b"") -> ScanResult:
    """Every readings row on any table-leaf page of ``db`` (the file) and ``wal`` (its WAL)."""
    result = ScanResult()
    try:
        pages = _Pages(db, wal)
    except (_Bad, struct.error, ValueError):
        return result
    for page_no in pages.numbers():
        for page, order in pages.copies(page_no):
            _scan_page(pages, page_no, page, order, result)
    return result


def scan_files(db: Path, wal: Path | None = None) -> ScanResult:
    """:func:`scan` over files, memory-mapped (a large outbox is not read into memory)."""
    with _mapped(db) as db_map, _mapped(wal) as wal_map:
        return scan(db_map, wal_map)


class _mapped:
    """A read-only mmap of a file, or b"" when it is missing or empty."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._map: mmap.mmap | None = None

    def __enter__(self) -> bytes | mmap.mmap:
        if self._path is None:
            return b""
        try:
            with self._path.open("rb") as f:
                if f.seek(0, 2) == 0:
                    return b""
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError:
            return b""
        return self._map

    def __exit__(self, *exc: object) -> None:
        if self._map is not None:
            self._map.close()


def _scan_page(
    pages: _Pages, page_no: int, page: bytes | memoryview, order: int, result: ScanResult
) -> None:
    hdr = 100 if page_no == 1 else 0
    if len(page) < hdr + 8:
        return
    assert pages.page_size is not None
    usable = pages.page_size - pages.reserved
    end = min(len(page), usable)
    kind = page[hdr]
    if kind in _OTHER_BTREE_PAGES:
        return
    damaged = kind != 0x0D
    if not damaged:
        ncells = int.from_bytes(page[hdr + 3 : hdr + 5], "big")
        for i in range(ncells):
            at = hdr + 8 + 2 * i
            if at + 2 > end:
                damaged = True
                break
            ptr = int.from_bytes(page[at : at + 2], "big")
            if not hdr + 8 <= ptr < end:
                damaged = True
                continue
            try:
                _scan_cell(pages, page, ptr, end, usable, order, result)
            except (_Bad, struct.error, ValueError, IndexError):
                damaged = True
    if damaged:
        _carve(pages, page, hdr, end, usable, order, result)


# Interior table, interior index and leaf index pages: never readings rows, and not damaged
# in a way that matters here (SQLite's ranges cover what hangs below them).
_OTHER_BTREE_PAGES = frozenset({0x02, 0x05, 0x0A})
_BTREE_PAGE_TYPES = frozenset({*_OTHER_BTREE_PAGES, 0x0D})


def _carve(
    pages: _Pages,
    page: bytes | memoryview,
    hdr: int,
    end: int,
    usable: int,
    order: int,
    result: ScanResult,
) -> None:
    """Find cells on a page whose header or cell pointers are damaged, byte by byte.

    The cells themselves may be intact. A carved row is kept only if its checksum (schema v2)
    matches its payload: that is what tells a real cell from garbage that happens to parse.
    """
    data = bytes(page[:end])
    if not data.strip(b"\0"):
        return
    q = data.find(b"\0", max(hdr, 1))
    while 0 < q < end - 1:
        # A readings record starts with its header size (one byte, 16..40 for 15 columns)
        # and the NULL of the seq column: look back from each such spot for the cell start.
        if 16 <= data[q - 1] <= 40:
            _carve_at(pages, data, q - 1, end, usable, order, result)
        q = data.find(b"\0", q + 1)


def _carve_at(
    pages: _Pages,
    data: bytes,
    record: int,
    end: int,
    usable: int,
    order: int,
    result: ScanResult,
) -> None:
    for start in range(max(0, record - 12), record - 1):
        try:
            size, pos = _varint(data, start, end)
            rowid, pos = _varint(data, pos, end)
            if pos != record or rowid < 1 or rowid >= 1 << 62 or size > 1 << 30:
                continue
            local = _local_size(size, usable)
            if pos + local > end:
                continue
            head = data[pos : pos + local]
            types = _record_types(head)
            if types is None or len(types) != len(_V2_TYPES) or not readings_shape(types):
                continue
            body = head if local == size else head + _overflow(pages, data, pos + local, end,
                                                                size - local, usable)  # fmt: skip
            values = _record_values(body, types)[1:]
        except (_Bad, struct.error, ValueError, IndexError):
            continue
        payload, checksum = values[2], values[10]
        if (
            isinstance(payload, bytes)
            and isinstance(checksum, str)
            and hashlib.sha256(payload).hexdigest() == checksum
        ):
            result.rows.setdefault(rowid, []).append(RawRow(rowid, values, order))
            return


def _scan_cell(
    pages: _Pages,
    page: bytes | memoryview,
    pos: int,
    end: int,
    usable: int,
    order: int,
    result: ScanResult,
) -> None:
    size, pos = _varint(page, pos, end)
    rowid, pos = _varint(page, pos, end)
    if rowid < 1 or rowid >= 1 << 62 or size > 1 << 30:
        raise _Bad
    local = _local_size(size, usable)
    if pos + local > end:
        raise _Bad
    head = bytes(page[pos : pos + local])
    types = _record_types(head)
    if types is None or not readings_shape(types):
        return
    try:
        body = head if local == size else head + _overflow(pages, page, pos + local, end,
                                                            size - local, usable)  # fmt: skip
        values = _record_values(body, types)
    except (_Bad, struct.error, ValueError, IndexError):
        result.undecodable.add(rowid)
        return
    result.rows.setdefault(rowid, []).append(RawRow(rowid, values[1:], order))


def _local_size(size: int, usable: int) -> int:
    # The cell-payload split of the file format (table b-tree leaf cells).
    x = usable - 35
    if size <= x:
        return size
    m = ((usable - 12) * 32 // 255) - 23
    k = m + (size - m) % (usable - 4)
    return k if k <= x else m


def _overflow(
    pages: _Pages, page: bytes | memoryview, at: int, end: int, remaining: int, usable: int
) -> bytes:
    if at + 4 > end:
        raise _Bad
    nxt = int.from_bytes(page[at : at + 4], "big")
    parts: list[bytes] = []
    seen: set[int] = set()
    while remaining > 0:
        if nxt < 1 or nxt in seen or len(seen) >= _MAX_OVERFLOW_PAGES:
            raise _Bad
        seen.add(nxt)
        over = pages.newest(nxt)
        if over is None or len(over) < 5:
            raise _Bad
        take = min(remaining, usable - 4, len(over) - 4)
        if take <= 0:
            raise _Bad
        parts.append(bytes(over[4 : 4 + take]))
        remaining -= take
        nxt = int.from_bytes(over[:4], "big")
    return b"".join(parts)


def _record_types(rec: bytes) -> list[int] | None:
    try:
        header_len, pos = _varint(rec, 0, len(rec))
        if header_len > len(rec) or header_len < pos:
            return None
        types: list[int] = []
        while pos < header_len:
            t, pos = _varint(rec, pos, header_len)
            types.append(t)
            if len(types) > 64:
                return None
        return types
    except _Bad:
        return None


def _record_values(rec: bytes, types: list[int]) -> tuple[Value, ...]:
    header_len, _ = _varint(rec, 0, len(rec))
    pos = header_len
    values: list[Value] = []
    for t in types:
        n = _serial_size(t)
        if pos + n > len(rec):
            raise _Bad
        values.append(_value(t, rec[pos : pos + n]))
        pos += n
    return tuple(values)


# --- the WAL, as SQLite would read it -------------------------------------------------------


def _wal_checksum(data: bytes | memoryview, s0: int, s1: int, big: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words) - 1, 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_damage(wal: Path) -> str | None:
    """Why SQLite would silently skip commits in this WAL (garbage header, a damaged frame
    followed by later frames of the same generation), or None when it reads it all."""
    with _mapped(wal) as data:
        return wal_damage_of(data)


def wal_damage_of(data: bytes | mmap.mmap) -> str | None:
    """:func:`wal_damage` on the WAL's bytes."""
    if len(data) < _WAL_HEADER:
        return None  # torn at creation: it cannot hold a frame, so no commit is in it
    magic, version, page_size = struct.unpack(">III", data[:12])
    big = magic == _WAL_MAGIC_BE
    if magic not in (_WAL_MAGIC_LE, _WAL_MAGIC_BE) or not _page_size_ok(page_size):
        frame_len = _FRAME_HEADER + _DEFAULT_PAGE_SIZE
        if len(data) < _WAL_HEADER + frame_len:
            return None
        return "the WAL header is not valid"
    if (version, _wal_checksum(data[:24], 0, 0, big)) != (
        3007000, struct.unpack(">II", data[24:32])
    ):
        return "the WAL header is not valid"
    salts = bytes(data[16:24])
    s0, s1 = struct.unpack(">II", data[24:32])
    frame_len = _FRAME_HEADER + page_size
    count = (len(data) - _WAL_HEADER) // frame_len
    first_bad: int | None = None
    previous = (s0, s1)  # the checksum a frame's own checksum continues from
    for i in range(count):
        off = _WAL_HEADER + i * frame_len
        frame = memoryview(data)[off : off + frame_len]
        ours = bytes(frame[8:16]) == salts
        stored = struct.unpack(">II", frame[16:24])
        c0, c1 = _wal_checksum(frame[:8], *previous, big)
        valid = ours and _wal_checksum(frame[_FRAME_HEADER:], c0, c1, big) == stored
        if first_bad is None and not valid:
            first_bad = i
        elif first_bad is not None and valid and int.from_bytes(frame[4:8], "big") != 0:
            # An intact commit of this generation after a damaged frame: SQLite stops at the
            # damage and would drop it. (Uncommitted frames written out of order before a
            # power cut are not damage: SQLite drops them rightly.)
            return f"WAL frame {first_bad + 1} of {count} is damaged; later commits would be lost"
        previous = stored
    return None
