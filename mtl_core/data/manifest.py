"""Reading a manifest CSV the way users have it: its encoding, its columns, its rows, streamed.

* Encoding: `data.encoding`, or detected: a byte-order mark (UTF-8, UTF-16, UTF-32), UTF-16 without one
  (the NUL bytes of its ASCII characters), else UTF-8. Bytes that do not decode fail with the line, the
  bytes and what came before them on that line, never with a bare "codec can't decode byte 0xe9".
  Latin-1 and cp1252 cannot be told from each other or from other 8-bit codecs for sure, so they are
  never guessed: the message asks for `data.encoding`.
* Records come from Python's csv module, one at a time with their physical line number, so a rejected
  row, a parse error and a decode error all name the line a text editor shows (blank lines are skipped,
  a line of empty cells is a record).
* Every label, split and group cell is Unicode-normalised (NFC) and stripped, so `café` typed on a Mac
  (NFD) and on Windows (NFC) is one class; column names too.
* Reserved names: `path` is the image column and `split` the split column (train/val/test, when present);
  `row` is where the ingested manifest numbers the CSV lines, so a manifest column `row` may not be a task
  or the weight column (one line says so). Unnamed columns (a trailing comma) are ignored and reported.
"""

from __future__ import annotations

import codecs
import csv
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PATH_COLUMN = "path"
SPLIT_COLUMN = "split"
ROW_COLUMN = "row"

_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
AUTO = "auto"


class IngestError(ValueError):
    """The manifest cannot be ingested; the message names the file, column or rows at fault."""


def clean(cell: str) -> str:
    """NFC-normalised and stripped (ASCII needs no normalisation: the common case stays cheap)."""
    return cell.strip() if cell.isascii() else unicodedata.normalize("NFC", cell).strip()


def detect_encoding(path: Path) -> tuple[str, str]:
    """(codec, how it was found) from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(4096)
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec, "byte-order mark"
    if len(head) >= 4 and b"\x00" in head:
        head = head[: len(head) // 2 * 2]
        even_zero = head[0::2].count(0) / (len(head) // 2)
        odd_zero = head[1::2].count(0) / (len(head) // 2)
        if odd_zero > 0.3 and even_zero < 0.05:
            return "utf-16-le", "UTF-16 without byte-order mark (NUL bytes)"
        if even_zero > 0.3 and odd_zero < 0.05:
            return "utf-16-be", "UTF-16 without byte-order mark (NUL bytes)"
    return "utf-8", "default (no byte-order mark)"


def locate_decode_error(path: Path, encoding: str) -> tuple[int, bytes, str] | None:
    """(line, offending bytes, the text before them on that line) of the first undecodable bytes, or None."""
    dec = codecs.getincrementaldecoder(encoding)(errors="strict")
    newlines, last_line = 0, ""
    with open(path, "rb") as f:
        while True:
            piece = f.read(1 << 20)
            state = dec.getstate()
            try:
                text = dec.decode(piece, final=not piece)
            except UnicodeDecodeError as err:
                buffered = len(err.object) - len(piece)  # bytes held back from the previous piece
                before = codecs.getincrementaldecoder(encoding)(errors="strict")
                before.setstate(state)
                good = before.decode(piece[: max(0, err.start - buffered)])
                text_before = last_line + good
                line = newlines + good.count("\n") + 1
                return line, bytes(err.object[err.start : err.end]), text_before.rsplit("\n", 1)[-1]
            newlines += text.count("\n")
            last_line = (last_line + text).rsplit("\n", 1)[-1][-200:]
            if not piece:
                return None


@dataclass
class ManifestFile:
    """An open manifest: its encoding, header (cleaned) and the records after it."""

    path: Path
    encoding: str
    encoding_source: str  # data.encoding, or how it was detected
    header: list[str]
    header_line: int

    @classmethod
    def open(cls, path: Path, encoding: str = AUTO) -> ManifestFile:
        if not path.is_file():
            raise IngestError(f"manifest not found: {path}")
        if encoding == AUTO:
            codec, how = detect_encoding(path)
        else:
            codec, how = encoding, "data.encoding"
        mf = cls(path, codec, how, [], 0)
        records = mf._raw_records()
        first = next(records, None)
        records.close()
        if first is not None:
            line, cells = first
            cells[0] = cells[0].lstrip("\ufeff")  # a UTF-8 BOM read as data.encoding: utf-8
            mf.header, mf.header_line = [clean(c) for c in cells], line
        if not mf.header:
            raise IngestError(f"{path}: not a readable CSV: the file is empty (no header line)")
        return mf

    def _raw_records(self) -> Iterator[tuple[int, list[str]]]:
        """(physical line of the record's start, cells) for each non-blank record."""
        try:
            with open(self.path, encoding=self.encoding, newline="") as f:
                reader = csv.reader(f, skipinitialspace=True, strict=True)  # bad quoting: an error, not a guess
                start = 1
                for cells in reader:
                    if cells:  # [] is a blank line; ",,," is a record (rejected: empty path)
                        yield start, cells
                    start = reader.line_num + 1
        except UnicodeDecodeError:
            raise IngestError(self._decode_message()) from None
        except csv.Error as err:
            # the record that fails started on line `start`: an unterminated quote is only noticed at the
            # end of the file, where the reader has gone looking for the closing quote
            if "unexpected end of data" in str(err):
                raise IngestError(
                    f"{self.path} line {start}: not a readable CSV: a quoted cell opened on line {start} is never "
                    f"closed (the reader ran to the end of the file, line {reader.line_num}, looking for its "
                    "closing quote); close the quote, or write a quote inside a quoted cell as \"\""
                ) from None
            where = f"line {start}" if reader.line_num <= start else f"line {start} (to line {reader.line_num})"
            raise IngestError(f"{self.path} {where}: not a readable CSV: {err}") from None

    def records(self) -> Iterator[tuple[int, list[str]]]:
        """The data records (after the header), each padded or left as long as it is."""
        it = self._raw_records()
        next(it, None)  # the header
        yield from it

    def _decode_message(self) -> str:
        found = locate_decode_error(self.path, self.encoding)
        name = {"utf-8": "UTF-8", "utf-8-sig": "UTF-8"}.get(self.encoding, self.encoding)
        if found is None:  # cannot happen for a strict decoder; say what we know
            where, what = "", f"not valid {name}"
        else:
            line, bad, before = found
            where = f" line {line}"
            what = f"not valid {name}: byte(s) {bad.hex(' ')} after {before[-40:]!r}"
        if self.encoding_source == "data.encoding":
            hint = f"is data.encoding: {self.encoding} the file's encoding?"
        else:
            hint = (
                f"the encoding was {self.encoding_source}, and an 8-bit encoding cannot be told for sure: "
                "give it as data.encoding (spreadsheet 'CSV' exports are often cp1252 or latin-1; "
                "'CSV UTF-8' avoids this)"
            )
        return f"{self.path}{where}: {what}; {hint}"


@dataclass(frozen=True)
class Columns:
    """Where each column the ingest uses sits in a record, checked against the configuration."""

    header: list[str]
    tasks: list[str]
    path: int
    task_index: list[int]
    weight: int | None
    split: int | None  # the manifest's own split column, when it has one
    group: int | None
    ignored: list[str]  # columns neither the path, a task, the weight, the split nor the group


def resolve_columns(
    header: list[str], csv_path: Path, tasks: list[str], weight_column: str | None, group_column: str | None
) -> Columns:
    """Check the header against data.tasks, data.sample_weight_column and data.split.group_column."""
    named = [c for c in header if c]
    twice = sorted({c for c in named if named.count(c) > 1})
    if twice:
        names = ", ".join(map(repr, twice))
        raise IngestError(f"{csv_path}: column name(s) {names} appear more than once in the header")
    if PATH_COLUMN not in header:
        raise IngestError(f"{csv_path}: no '{PATH_COLUMN}' column; columns found: {', '.join(named) or '(none)'}")
    reserved = (
        f"{csv_path}: column '{ROW_COLUMN}' is reserved (the ingested manifest numbers the CSV lines in it): "
        "rename it, or leave it out of data.tasks and data.sample_weight_column"
    )
    if weight_column is not None:
        if weight_column in (PATH_COLUMN, SPLIT_COLUMN):
            raise IngestError(
                f"{csv_path}: '{weight_column}' cannot be the sample weight column (data.sample_weight_column)"
            )
        if weight_column == ROW_COLUMN:
            raise IngestError(reserved)
        if weight_column not in header:
            raise IngestError(
                f"{csv_path}: sample weight column '{weight_column}' (data.sample_weight_column) not in the "
                f"manifest; columns found: {', '.join(named)}"
            )
        if weight_column in tasks:
            raise IngestError(
                f"{csv_path}: column '{weight_column}' is the sample weight column (data.sample_weight_column) "
                "and cannot also be a task"
            )
    if group_column is not None:
        if group_column not in header:
            raise IngestError(
                f"{csv_path}: group column '{group_column}' (data.split.group_column) not in the manifest; "
                f"columns found: {', '.join(named)}"
            )
        if group_column in tasks:
            raise IngestError(
                f"{csv_path}: column '{group_column}' is the group column (data.split.group_column) and cannot "
                "also be a task"
            )
    if SPLIT_COLUMN in tasks:
        raise IngestError(
            f"{csv_path}: '{SPLIT_COLUMN}' is reserved and cannot be a task column: a manifest column "
            f"'{SPLIT_COLUMN}' (train/val/test) is the split"
        )
    label_columns = [c for c in named if c not in (PATH_COLUMN, SPLIT_COLUMN, weight_column, group_column)]
    if not tasks:
        tasks = label_columns
    if ROW_COLUMN in tasks:
        raise IngestError(reserved)
    unknown = [t for t in tasks if t not in label_columns]
    if unknown:
        raise IngestError(
            f"{csv_path}: task column(s) {', '.join(map(repr, unknown))} not in the manifest; "
            f"label columns found: {', '.join(label_columns) or '(none)'}"
        )
    if not tasks:
        raise IngestError(f"{csv_path}: no label columns besides '{PATH_COLUMN}'")
    used = {PATH_COLUMN, SPLIT_COLUMN, weight_column, group_column, *tasks}
    ignored = [c if c else f"(unnamed column {i + 1})" for i, c in enumerate(header) if c not in used]
    index = header.index
    return Columns(
        header=header,
        tasks=list(tasks),
        path=index(PATH_COLUMN),
        task_index=[index(t) for t in tasks],
        weight=index(weight_column) if weight_column is not None else None,
        split=index(SPLIT_COLUMN) if SPLIT_COLUMN in header else None,
        group=index(group_column) if group_column is not None else None,
        ignored=ignored,
    )
