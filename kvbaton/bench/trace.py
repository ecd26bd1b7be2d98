"""Mooncake-format request traces.

Mooncake published its traces as JSONL, one request a line::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

``timestamp`` is the arrival in milliseconds; each hash id names one ``block_size``-token block
of the prompt (512 in Mooncake's traces), so requests that start with the same ids start with
the same tokens, and ``len(hash_ids) == ceil(input_length / block_size)``. The bundled
``kvbaton/bench/data/sample_trace.jsonl`` is a synthetic trace in this format (see
``scripts/build_corpus.py``), not Mooncake's data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TraceRecord:
    """One trace line."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_record(line: str, block_size: int = 512) -> TraceRecord:
    """One JSONL line as a record; ValueError naming the bad field."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    for key in ("timestamp", "input_length", "output_length", "hash_ids"):
        if key not in obj:
            raise ValueError(f"missing field {key!r}")
    ts = obj["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise ValueError(f"'timestamp' must be a number of ms >= 0, got {ts!r}")
    if not _int(obj["input_length"]) or obj["input_length"] < 1:
        raise ValueError(f"'input_length' must be an integer >= 1, got {obj['input_length']!r}")
    if not _int(obj["output_length"]) or obj["output_length"] < 0:
        raise ValueError(f"'output_length' must be an integer >= 0, got {obj['output_length']!r}")
    ids = obj["hash_ids"]
    if not isinstance(ids, list) or not all(_int(h) for h in ids):
        raise ValueError("'hash_ids' must be a list of integers")
    need = math.ceil(obj["input_length"] / block_size)
    if len(ids) != need:
        raise ValueError(f"'hash_ids' has {len(ids)} ids but input_length {obj['input_length']} "
                         f"needs {need} blocks of {block_size} tokens")
    return TraceRecord(float(ts), obj["input_length"], obj["output_length"], tuple(ids))


def read_mooncake_trace(path: Path, block_size: int = 512) -> list[TraceRecord]:
    """Every record of a Mooncake-format JSONL file, in file order (blank lines skipped).

    ValueError with the file and line number if a line is malformed, the file is missing or
    empty, or timestamps go backwards (a replay needs them in arrival order).
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"option 'trace_file': cannot read {path}: {e.strerror or e}") from None
    records: list[TraceRecord] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = parse_record(line, block_size)
        except ValueError as e:
            raise ValueError(f"{path}:{no}: {e}") from None
        if records and rec.timestamp_ms < records[-1].timestamp_ms:
            raise ValueError(f"{path}:{no}: 'timestamp' goes backwards "
                             f"({rec.timestamp_ms} after {records[-1].timestamp_ms})")
        records.append(rec)
    if not records:
        raise ValueError(f"option 'trace_file': {path} has no records")
    return records
