"""The output folder of ``explain``: written a part at a time, so that a run killed halfway
continues where it stopped, and read by tools directly.

    DIR/run.json                 the run's settings; a run with other settings is refused
    DIR/.lock                    held while a run writes, so that two runs cannot share a folder
    DIR/parts/part-00000.json    the summary rows of inputs [0, S), written last: the part's commit
    DIR/relevance/part-00000.npy those rows' relevance, [rows, *input shape], float32 or float16
    DIR/<input>_class<k>.png     a heatmap per input and explained class (unless heatmaps are off)
    DIR/summary.csv, summary.parquet (with pyarrow), summary.json (on request): every part's rows

A part covers ``shard_inputs`` consecutive inputs. Its files appear by rename, the part's JSON
after its shard and heatmaps, so a part is there whole or not at all. On resume the inputs of the
committed parts are skipped, after checking that they are the same inputs in the same order.
"""

import csv
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Optional

import numpy as np

from ..errors import InputError, OutputError
from .files import atomic_path, atomic_write, remove_temporaries, writable_folder

fcntl: Optional[ModuleType]
try:
    import fcntl
except ImportError:  # Windows: no advisory lock, and no guard against two runs in one folder
    fcntl = None

# The summary's columns and their Parquet types; an input that could not be explained has its name,
# source and error, and nulls elsewhere.
SUMMARY_COLUMNS = {
    "input": "string",
    "source": "string",
    "predicted": "int64",
    "predicted_label": "string",
    "target": "int64",
    "target_label": "string",
    "logit": "float64",
    "relevance_sum": "float64",
    "conservation": "float64",
    "positive_share": "float64",
    "negative_share": "float64",
    "positive_negative_ratio": "float64",
    "heatmap": "string",
    "relevance_shard": "string",
    "relevance_row": "int64",
    "error": "string",
}
# A shard's relevance is held in memory until it is written: about this many bytes.
SHARD_BYTES = 64 << 20
MAX_SHARD_INPUTS = 1024


def default_shard_inputs(sample_shape, dtype, explained_per_input):
    """Inputs per part: a shard of about SHARD_BYTES of relevance, between 1 and MAX_SHARD_INPUTS
    inputs (a small model's part is then a few seconds of work, lost at most by a kill)."""
    row = int(np.prod(sample_shape)) * np.dtype(dtype).itemsize * explained_per_input
    return int(np.clip(SHARD_BYTES // max(row, 1), 1, MAX_SHARD_INPUTS))


DEFAULT_ROOT = "lrp-out"


def default_run_folder(model_label, settings):
    """lrp-out/MODEL-XXXXXXXX, XXXXXXXX from the run's settings: an identical run continues in its
    folder, any other (another model, composite, input or option) gets its own, and none deletes
    another's results."""
    stem = re.sub(r"(\.lrp)?\.onnx$", "", os.path.basename(str(model_label))) or "model"
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return os.path.join(DEFAULT_ROOT, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}-{digest}")


@dataclass
class Totals:
    inputs: int = 0  # every input, in this run and the earlier ones it continued
    failed: int = 0  # inputs that could not be explained (their rows hold the error)
    explanations: int = 0
    resumed: int = 0  # inputs already done by an earlier run with the same settings
    overflowed: int = 0  # relevance values past float16's range, stored as ±inf (this run)
    errors: list = field(default_factory=list)  # (input, error) of the first ERRORS_KEPT that failed
    folder: str = ""  # where the run wrote


ERRORS_KEPT = 3  # failed inputs whose error the CLI prints in full (the rest it counts)


class RunFolder:
    """``add`` an Outcome per input, in order; ``finish`` writes the summaries. ``settings`` must
    equal those of the run that left the folder, if any; ``restart`` discards that run instead."""

    def __init__(self, folder, settings, shard_inputs, relevance_dtype="float32", heatmap=None, restart=False):
        settings = json.loads(json.dumps(settings))  # as run.json reads back: tuples are lists
        self.folder, self.settings, self.shard_inputs = folder, settings, shard_inputs
        self.relevance_dtype, self.heatmap = np.dtype(relevance_dtype), heatmap
        self.created = not os.path.isdir(folder)
        writable_folder(folder)
        self._lock = _lock(folder)
        for sub in ("parts", "relevance"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
            remove_temporaries(os.path.join(folder, sub))
        remove_temporaries(folder)
        previous = self._read_settings()
        if previous is None and self._committed_parts() and not restart:
            raise OutputError(
                f"{folder}: holds parts of a run whose run.json is gone; pass --restart to discard "
                "them, or choose another -o"
            )
        if previous is not None and previous != settings:
            if not restart:
                changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                raise OutputError(
                    f"{folder}: holds a run with other settings ({', '.join(changed)}); pass "
                    "--restart to discard it, or choose another -o"
                )
            self._discard()
        elif restart:
            self._discard()
        self.parts = self._committed_parts()
        atomic_write(os.path.join(folder, "run.json"), json.dumps(settings, indent=1, sort_keys=True).encode())
        self.totals = Totals(folder=folder)
        for part in self._read_parts():
            self._count(part["rows"], len(part["sources"]))
        self.totals.resumed = self.totals.inputs
        self._rows, self._sources, self._relevance = [], [], []

    def skip_done(self, pending):
        """``pending`` (an iterator of inputs) past the inputs of the committed parts, which must be
        the ones they recorded, in the same order."""
        pending = iter(pending)
        for part in self._read_parts():
            for expected in part["sources"]:
                found = next(pending, None)
                if found is None or found.source != expected:
                    raise InputError(
                        f"{self.folder}: the inputs are not those of the run being continued "
                        f"(expected {expected!r}, found {found.source if found else 'no more inputs'!r}); "
                        "pass --restart to start over"
                    )
        return pending

    def add(self, outcome):
        """One input's Outcome: its heatmaps now, its rows and relevance with its part."""
        self._sources.append(outcome.source)
        if outcome.error is not None:
            self._rows.append({"input": outcome.name, "source": outcome.source, "error": outcome.error})
        for e in outcome.explanations:
            png = self.heatmap(e, self.folder) if self.heatmap else None
            self._rows.append(
                dict(e.summary(), heatmap=png, relevance_shard=self._shard_name(), relevance_row=len(self._relevance))
            )
            self._relevance.append(e.relevance)
        if len(self._sources) == self.shard_inputs:
            self._commit()

    def finish(self, as_json=False):
        """Commit the last part, write summary.csv, summary.parquet (where pyarrow is installed)
        and, ``as_json``, summary.json, each from every part in order; returns the Totals and the
        names of the summaries written."""
        if self._sources:
            self._commit()
        written = [self._write_csv()]
        parquet = self._write_parquet()
        written += [parquet] if parquet else []
        if as_json:
            written.append(self._write_json())
        return self.totals, written

    def close(self, completed):
        """Release the folder. A run that stopped before committing a part leaves no trace: its
        files go, and the folder too if the run made it."""
        self._unlock()
        if completed or self.parts:
            return
        for name in ("run.json", ".lock"):
            os.unlink(os.path.join(self.folder, name))
        for sub in ("parts", "relevance"):
            os.rmdir(os.path.join(self.folder, sub))
        if self.created:
            os.rmdir(self.folder)

    def _commit(self):
        """The shard, then the part's JSON: a part is committed once its JSON is there."""
        part = len(self.parts)
        if self._relevance:
            values = np.stack(self._relevance)
            with np.errstate(over="ignore"):
                stored = values.astype(self.relevance_dtype)
            self.totals.overflowed += int((np.isinf(stored) & np.isfinite(values)).sum())
            atomic_write(os.path.join(self.folder, self._shard_name()), _npy_bytes(stored))
        record = {"part": part, "sources": self._sources, "rows": self._rows}
        atomic_write(self._part_path(part), json.dumps(record).encode())
        self.parts.append(part)
        self._count(self._rows, len(self._sources))
        self._rows, self._sources, self._relevance = [], [], []

    def _count(self, rows, inputs):
        self.totals.inputs += inputs
        self.totals.failed += sum(1 for r in rows if r.get("error"))
        failed = [(r["input"], r["error"]) for r in rows if r.get("error")]
        self.totals.errors += failed[: ERRORS_KEPT - len(self.totals.errors)]
        self.totals.explanations += sum(1 for r in rows if not r.get("error"))

    def _shard_name(self):
        return f"relevance/part-{len(self.parts):05d}.npy"

    def _part_path(self, part):
        return os.path.join(self.folder, "parts", f"part-{part:05d}.json")

    def _committed_parts(self):
        """Parts 0, 1, ... whose JSON is there, up to the first missing one."""
        parts = []
        while os.path.exists(self._part_path(len(parts))):
            parts.append(len(parts))
        return parts

    def _read_parts(self):
        for part in self.parts:
            with open(self._part_path(part)) as f:
                yield json.load(f)

    def _rows_in_order(self):
        for part in self._read_parts():
            yield from map(_in_columns, part["rows"])

    def _read_settings(self):
        path = os.path.join(self.folder, "run.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _discard(self):
        """Remove what an earlier run wrote here (its heatmaps by name, from its parts), nothing else."""
        for path in sorted(glob.glob(os.path.join(self.folder, "parts", "part-*.json"))):
            with open(path) as f:
                heatmaps = [row.get("heatmap") for row in json.load(f)["rows"]]
            for name in filter(None, heatmaps):
                if os.path.exists(os.path.join(self.folder, name)):
                    os.unlink(os.path.join(self.folder, name))
            os.unlink(path)
        for path in glob.glob(os.path.join(self.folder, "relevance", "part-*.npy")):
            os.unlink(path)
        for name in ("summary.csv", "summary.parquet", "summary.json"):
            if os.path.exists(os.path.join(self.folder, name)):
                os.unlink(os.path.join(self.folder, name))

    def _write_csv(self):
        with atomic_path(os.path.join(self.folder, "summary.csv")) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(SUMMARY_COLUMNS))
            writer.writeheader()
            writer.writerows(self._rows_in_order())
        return "summary.csv"

    def _write_parquet(self):
        """summary.parquet, a row group per part; None where pyarrow is not installed."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return None
        schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in SUMMARY_COLUMNS.items()])
        with atomic_path(os.path.join(self.folder, "summary.parquet")) as tmp:
            with pq.ParquetWriter(tmp, schema) as writer:
                for part in self._read_parts():
                    rows = [_in_columns(row) for row in part["rows"]]
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        return "summary.parquet"

    def _write_json(self):
        with atomic_path(os.path.join(self.folder, "summary.json")) as tmp, open(tmp, "w") as f:
            f.write("[")
            for i, row in enumerate(self._rows_in_order()):
                f.write((",\n" if i else "\n") + json.dumps(row))
            f.write("\n]\n")
        return "summary.json"

    def _unlock(self):
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _in_columns(row):
    """A part's row with every summary column, in order (an error row has nulls)."""
    return {column: row.get(column) for column in SUMMARY_COLUMNS}


def _lock(folder):
    """An exclusive lock on DIR/.lock, held while the run writes: two runs in one folder would
    interleave their parts."""
    handle = open(os.path.join(folder, ".lock"), "a")
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise OutputError(f"{folder}: another lrp-onnx run is writing this folder") from None
    return handle


def _npy_bytes(array):
    import io

    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()
