"""Read a data file into named columns: TSV (the GLUE layouts as distributed), CSV, JSON
Lines, plain text. Errors say what was found and what to do."""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from pathlib import Path

from rosafx.errors import RosafxError
from rosafx.io.reading import read_bytes

TEXT = "text"  # the one column of a plain-text file (one example per non-empty line)
FIELD_LIMIT = 16 * 2**20  # characters in one TSV/CSV field (csv's default is 128 KiB)


@dataclasses.dataclass
class Layout:
    """A known layout: the header columns that identify it, and what each column is."""
    name: str
    header: frozenset
    text: str
    pair: str | None
    label: str
    task: str


# Most specific first: a header is recognised by the first layout whose columns it holds.
LAYOUTS = [
    Layout("MRPC", frozenset({"Quality", "#1 String", "#2 String"}), "#1 String", "#2 String", "Quality",
           "classification"),
    Layout("STS-B", frozenset({"sentence1", "sentence2", "score"}), "sentence1", "sentence2", "score", "regression"),
    Layout("RTE", frozenset({"sentence1", "sentence2", "label"}), "sentence1", "sentence2", "label", "classification"),
    Layout("SST-2", frozenset({"sentence", "label"}), "sentence", None, "label", "classification"),
    Layout("text", frozenset({"text", "label"}), "text", None, "label", "classification"),
]
# CoLA has no header: source, label, original mark, sentence.
COLA = Layout("CoLA", frozenset(), "sentence", None, "label", "classification")
COLA_COLUMNS = ["source", "label", "mark", "sentence"]


@dataclasses.dataclass
class Table:
    """Stored by column (one list per column, not a dict per row: a 200k-row file is 200k
    values per column, not 200k dicts)."""
    path: Path
    columns: list[str]
    values: dict[str, list]   # column -> each row's value (str; any JSON value for JSONL, None where a row lacks it)
    lines: list[int]          # each row's line number in the file, for error messages
    layout: Layout | None     # a recognised layout, or None

    def __len__(self) -> int:
        return len(self.lines)

    def column(self, name: str) -> list:
        if name not in self.columns:
            raise RosafxError(f"{self.path}: no column '{name}'. Columns found: {self.columns}.")
        return self.values[name]


def read_table(path) -> Table:
    path = Path(path)
    text = _decode(path, read_bytes(path, "a data file (.tsv, .csv, .jsonl or .txt)"))  # regular files only
    if not text.strip():
        raise RosafxError(f"Data file {path} is empty.")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, text)
    if suffix == ".txt":
        lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
        return Table(path, [TEXT], {TEXT: [line for _, line in lines]}, [i for i, _ in lines], None)
    if suffix not in (".tsv", ".csv"):
        raise RosafxError(f"Cannot tell the format of {path}: use .tsv, .csv, .jsonl or .txt.")
    return _read_delimited(path, text, "\t" if suffix == ".tsv" else ",")


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (MRPC has one) is not part of the first column name
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RosafxError(f"{path} is not UTF-8 text (byte {exc.start}, line {line}): re-save it as UTF-8, "
                          "e.g. iconv -f latin1 -t utf-8.") from exc


def _read_delimited(path: Path, text: str, delimiter: str) -> Table:
    # GLUE TSVs hold unbalanced quotes in their text: no quoting for TSV
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    records = ((line, row) for line, row in _records(path, text, delimiter, quoting) if row)
    line, first = next(records)
    layout = next((layout for layout in LAYOUTS if layout.header <= set(first)), None)
    if layout is None and _looks_like_cola(first):
        columns, layout = COLA_COLUMNS, COLA
        records = itertools.chain([(line, first)], records)
    else:
        columns = [c.strip() for c in first]
    if len(set(columns)) != len(columns):
        raise RosafxError(f"{path}: repeated column names in the header {columns}.")
    values, lines = [[] for _ in columns], []
    for line, row in records:
        if len(row) != len(columns):
            raise RosafxError(f"{path}, line {line}: {len(row)} fields where the header has {len(columns)} "
                              f"({columns}). Is the delimiter right ({'tab' if delimiter == chr(9) else 'comma'})?")
        for column, value in zip(values, row):
            column.append(value)
        lines.append(line)
    if not lines:
        raise RosafxError(f"{path} has a header {columns} and no rows.")
    return Table(path, columns, dict(zip(columns, values)), lines, layout)


def _records(path: Path, text: str, delimiter: str, quoting: int):
    """(line number, fields) of each record, read as they come. csv's own limit of 128 KiB
    per field is raised to FIELD_LIMIT for the read (a text longer than that is not one
    example: the tokenizer keeps --max-length tokens of it anyway) and put back after."""
    reader = csv.reader(_lines(text), delimiter=delimiter, quoting=quoting)
    before = csv.field_size_limit(FIELD_LIMIT)
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as exc:
        line = reader.line_num
        if "field larger than field limit" in str(exc):
            raise RosafxError(f"{path}, line {line}: a field is longer than {FIELD_LIMIT // 2**20} MiB, the most "
                              "rosafx reads as one text. Split or shorten it.") from None
        raise RosafxError(f"{path}, line {line}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} ({exc}).") from None
    finally:
        csv.field_size_limit(before)


def _lines(text: str):
    """The lines of ``text`` with their endings, one at a time (no list of every line, no copy of the text)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _looks_like_cola(first: list[str]) -> bool:
    return len(first) == 4 and first[1].strip().lstrip("-").isdigit() and first[2] in ("", "*", "?", "??", "*?")


def _read_jsonl(path: Path, text: str) -> Table:
    values: dict[str, list] = {}
    lines: list[int] = []
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RosafxError(f"{path}, line {number}: not JSON ({exc.msg}). JSON Lines has one object per line.") from exc
        if not isinstance(row, dict):
            raise RosafxError(f"{path}, line {number}: a JSON object with named fields is needed, got {type(row).__name__}.")
        for name in row:
            if name not in values:
                values[name] = [None] * len(lines)  # earlier rows lack it
        for name, column in values.items():
            column.append(row.get(name))
        lines.append(number)
    columns = list(values)
    layout = next((layout for layout in LAYOUTS if layout.header <= set(columns)), None)
    return Table(path, columns, values, lines, layout)


def strings(table: Table, name: str) -> list[str]:
    values = table.column(name)
    for line, value in zip(table.lines, values):
        if not isinstance(value, str):
            raise RosafxError(f"{table.path}, line {line}: column '{name}' holds {value!r}, not text.")
    return values
