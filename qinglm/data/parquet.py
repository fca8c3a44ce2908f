"""The text column of .parquet files, read one batch of rows at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from qinglm.errors import QingLMError

_PARQUET_BATCH_ROWS = 8192


def parquet_texts(path: Path, text_field: str) -> Iterator[tuple[int, str | None, str]]:
    """Yield (row number, text, "") for each row of the text column, (row number, None, "null text")
    for a null; the column is `text_field`, or else the only string column."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise QingLMError("reading .parquet files needs pyarrow: pip install pyarrow") from None
    row = 0
    try:
        parquet = pq.ParquetFile(path)
        column = _text_column(path, parquet.schema_arrow, text_field)
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield (row, None, "null text") if value is None else (row, value, "")
    except (pa.ArrowException, OSError) as e:
        raise QingLMError(f"{path} is not a readable parquet file ({e})") from None


def _text_column(path: Path, schema: object, text_field: str) -> str:
    """Return the name of the column holding the text: `text_field`, else the only string column."""
    import pyarrow as pa

    def is_string(t: object) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view"

    columns = ", ".join(f"{f.name} ({f.type})" for f in schema)
    if text_field in schema.names:
        if not is_string(schema.field(text_field).type):
            raise QingLMError(f"{path}: column {text_field!r} is not text; columns are: {columns}")
        return text_field
    strings = [f.name for f in schema if is_string(f.type)]
    if len(strings) != 1:
        which = "no" if not strings else "several"
        raise QingLMError(
            f"{path}: no {text_field!r} column and {which} string columns; "
            f"pass --text-field with one of: {columns}"
        )
    return strings[0]
