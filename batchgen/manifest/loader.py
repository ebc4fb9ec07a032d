"""``Manifest``: a manifest file loaded — its top-level keys checked, its schema found, its jobs
counted before any is expanded. ``iter_jobs`` streams the jobs (expand.py)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..constants import DEFAULT_MAX_EXPAND, DEFAULT_MODEL, WORKDIR_FILES
from ..errors import ManifestError, Problem
from ..outputnames import DEVICE_NAMES
from ..schema import ModelSchema, SchemaError, find_schema
from .csvread import line_count, row_count
from .expand import OUTPUT_NAME, Expansion
from .imagerefs import ImageRefs, is_loopback_host
from .problems import ProblemLog, did_you_mean
from .spec import JobSpec, Level
from .values import Invalid, json_problem
from .yamlread import YamlDoc, YamlUnreadable, read_yaml

TOP_KEYS = ("name", "model", "schema", "image_base_url", "defaults", "jobs", "rows", "matrix", "repeat")
_BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def batch_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a batch, if it cannot. A batch's outputs go to the folder
    ``<work directory>/<name>``, so the name must be a folder name on every system, and none of
    the files batchgen keeps there (compared without case: macOS and Windows ignore it)."""
    if not _BATCH_NAME.match(name) or name.endswith("."):
        return (f"batch name '{name}' is not allowed; use letters, digits, '.', '_' and '-', starting with a "
                "letter or digit and not ending with '.' (it becomes a folder name)")
    if name.lower() in WORKDIR_FILES:
        return (f"batch name '{name}' is reserved: batchgen keeps a file or folder of that name in the work directory; "
                "choose another name")
    if name.split(".")[0].upper() in DEVICE_NAMES:  # a folder cannot have them either
        return f"batch name '{name}' is a device name on Windows and cannot be a folder there; choose another name"
    return None


def batch_name_clash(name: str, recorded: Collection[str]) -> str | None:
    """Why a new batch ``name`` cannot join the ``recorded`` batches of a store, if it cannot:
    one that differs from it only by case (Unicode casefold). macOS and Windows ignore case in
    folder names, so the two would share a folder there, overwrite each other's files, and
    ``forget --delete-files`` of one would delete the other's. Stores that already hold such a
    pair keep working: only a new name is refused."""
    if name in recorded:
        return None  # not new: the batch itself
    folded = name.casefold()
    for other in recorded:
        if other.casefold() == folded:
            return (f"batch name '{name}' differs only in case from the batch '{other}' already in this work "
                    "directory; on macOS and Windows both would share one folder and overwrite each other's "
                    f"files. Use '{other}' to add to that batch, or choose another name")
    return None


class Manifest:
    """A loaded manifest.

    ``problems`` holds what is wrong: what loading found, plus what the last ``iter_jobs()`` pass
    met (cells that do not cast, unknown columns, templates, images). ``iter_jobs()`` streams
    the expanded jobs; ``duplicates`` counts jobs it skipped because an earlier one had their key.
    """

    def __init__(self, path: str | Path, *, batch: str | None = None, schema_path: str | Path | None = None,
                 max_expand: int = DEFAULT_MAX_EXPAND):
        self.path = Path(path)
        self.max_expand = max_expand
        self.file = self.path.name
        self.folder = self.path.resolve().parent
        self.name = ""
        self.model_id = DEFAULT_MODEL
        self.image_base_url: str | None = None
        self.schema: ModelSchema | None = None
        self.defaults: dict[str, Any] = {}
        self.matrix: dict[str, list[Any]] = {}
        self.repeat = 1
        self.listed: list[Level] = []  # the jobs listed in the YAML file
        self.rows: Path | None = None  # the CSV file of rows
        self.rows_name = ""  # ... as the manifest names it
        self.key_lines: dict[str, dict[str, int]] = {"defaults": {}, "matrix": {}}  # lines inside them
        self._loaded = ProblemLog()
        self._met = ProblemLog()  # by the last iter_jobs pass
        self._expansion: Expansion | None = None
        self._fatal = False  # nothing can be expanded (unreadable file, bad YAML, bad schema)
        self._lines: dict[str, int] = {}

        given_name, model_given, schema_file = self._read_file(Path(schema_path) if schema_path else None)
        self._batch_given = batch is not None
        self.name = batch if batch is not None else given_name or self._name_from_file()
        why = batch_name_problem(self.name)
        if why:
            self._problem(self._where("name") if batch is None else "", "name", why)
        self._find_schema(schema_file, model_given)
        self.images = ImageRefs(self.folder, self.image_base_url, schema_known=self.schema is not None)
        if not self._fatal:
            self._check_size()

    # ---- problems ------------------------------------------------------------------------------

    @property
    def problems(self) -> list[Problem]:
        return [*self._loaded, *self._met]

    @property
    def duplicates(self) -> int:
        """Jobs the last ``iter_jobs()`` skipped because an earlier one had their key."""
        return self._expansion.duplicates if self._expansion is not None else 0

    @property
    def bad_refs(self) -> set[str]:
        """Image references found unusable (already reported); validation skips them."""
        return self.images.bad

    def raise_problems(self) -> None:
        if self.problems:
            raise ManifestError(self.problems)

    def _problem(self, location: str, field_name: str, message: str) -> None:
        self._loaded.add(Problem(self.file, location, field_name, message))

    def location_of(self, key: str) -> str:
        """Where a top-level key of a YAML manifest is ("line 3"), "" if not written there."""
        return self._where(key)

    def _where(self, key: str) -> str:
        return f"line {self._lines[key]}" if key in self._lines else ""

    def top_level(self, key: str) -> Level:
        """A top-level key (defaults, matrix) as a layer, for problems about what is in it."""
        return Level({}, self.file, self._where(key), self.folder, lines=self.key_lines.get(key, {}))

    def _name_from_file(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.path.stem).strip("-._") or "batch"

    # ---- loading -------------------------------------------------------------------------------

    def _read_file(self, schema_file: Path | None) -> tuple[str | None, bool, Path | None]:
        """(the name the file gives, whether it names its model, the schema file to use)."""
        suffix = self.path.suffix.lower()
        if suffix == ".csv":
            self.rows, self.rows_name = self.path, self.file
            return None, False, schema_file
        if suffix in (".yaml", ".yml"):
            name, model_given, yaml_schema = self._read_yaml()
            return name, model_given, schema_file or yaml_schema
        self._problem("", "", f"unsupported manifest type '{self.path.suffix}'; use .yaml, .yml or .csv")
        self._fatal = True
        return None, False, schema_file

    def _read_yaml(self) -> tuple[str | None, bool, Path | None]:
        """Read the YAML file's keys; return (name, whether model was given, schema file)."""
        try:
            doc = read_yaml(self.path, TOP_KEYS)
        except YamlUnreadable as exc:
            self._problem(exc.location, "", exc.message)
            self._fatal = True
            return None, False, None
        self._lines = doc.lines
        data = doc.data
        for key in data:
            if key == OUTPUT_NAME:  # a job's value, as a prompt is: where every job gets it
                self._problem(self._where(key), key, "output_name is a job's value: put it under defaults "
                              "(every job), in a job, or in a CSV column")
            elif key not in TOP_KEYS:
                self._problem(self._where(key), key, f"unknown key{did_you_mean(key, TOP_KEYS)}; "
                              f"allowed: {', '.join(TOP_KEYS)}")
        name = self._read_name(data)
        model_given = self._read_model(data)
        schema_file = self._read_schema_file(data)
        self._read_image_base_url(data)
        self._read_defaults(doc)
        self._read_matrix(doc)
        self._read_repeat(data)
        self._read_rows(data)
        self._read_jobs(doc)
        if "jobs" not in data and "rows" not in data:
            if "matrix" in data:
                # `defaults` + `matrix` alone: one job of the defaults, times every combination
                # (what a user writing a seed sweep means; validation still checks each job).
                self.listed.append(Level({}, self.file, self._where("matrix"), self.folder))
            else:
                self._problem("", "jobs", "the manifest has no jobs: add a 'jobs' list, 'rows: file.csv', "
                              "or a 'matrix' over the defaults")
        # PyYAML keeps the last of two equal keys without a word; the user surely meant one.
        for location, key, message in doc.duplicates:
            self._problem(location, key, message)
        return name, model_given, schema_file

    def _read_name(self, data: dict[str, Any]) -> str | None:
        if "name" not in data:
            return None
        if isinstance(data["name"], str | int) and not isinstance(data["name"], bool):
            return str(data["name"])
        self._problem(self._where("name"), "name", "must be a string")
        return None

    def _read_model(self, data: dict[str, Any]) -> bool:
        if "model" not in data:
            return False
        if isinstance(data["model"], str) and data["model"].strip().strip("/"):
            self.model_id = data["model"].strip().strip("/")
            return True
        self._problem(self._where("model"), "model", "must be a model id such as " + DEFAULT_MODEL)
        return False

    def _read_schema_file(self, data: dict[str, Any]) -> Path | None:
        if "schema" not in data:
            return None
        if not isinstance(data["schema"], str):
            self._problem(self._where("schema"), "schema", "must be the path of a schema file")
        elif not (self.folder / data["schema"]).is_file():
            self._problem(self._where("schema"), "schema", f"schema file not found: {data['schema']}")
            self._fatal = True
        else:
            return self.folder / data["schema"]
        return None

    def _read_image_base_url(self, data: dict[str, Any]) -> None:
        if "image_base_url" not in data:
            return
        url = data["image_base_url"]
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            self._problem(self._where("image_base_url"), "image_base_url",
                          "must be an https:// URL where the manifest's local images are published")
        elif parts.scheme == "http" and not is_loopback_host(parts.hostname):
            self._problem(self._where("image_base_url"), "image_base_url",
                          "must be https:// (plain http only for loopback addresses)")
        else:
            self.image_base_url = url.rstrip("/")

    def _read_defaults(self, doc: YamlDoc) -> None:
        defaults = doc.data.get("defaults")
        if isinstance(defaults, dict):
            self.defaults = {str(k): v for k, v in defaults.items()}
            self.key_lines["defaults"] = doc.key_lines("defaults")
            self._check_values(self.defaults, self.key_lines["defaults"], "defaults")
        elif defaults is not None:
            self._problem(self._where("defaults"), "defaults", "must be a mapping of field: value")

    def _read_matrix(self, doc: YamlDoc) -> None:
        if "matrix" not in doc.data:
            return
        m = doc.data["matrix"]
        if not isinstance(m, dict) or not m:
            self._problem(self._where("matrix"), "matrix", "must be a mapping of field: [values, ...]")
            return
        lines = self.key_lines["matrix"] = doc.key_lines("matrix")
        for k, v in m.items():
            if not isinstance(v, list) or not v:
                where = f"line {lines.get(str(k), self._lines.get('matrix', 0))}"
                self._problem(where, f"matrix.{k}", "must be a non-empty list of values")
            else:
                self.matrix[str(k)] = v
        self._check_values(self.matrix, lines, "matrix")
        self.matrix = {k: v for k, v in self.matrix.items() if not isinstance(v, Invalid)}

    def _read_repeat(self, data: dict[str, Any]) -> None:
        if "repeat" not in data:
            return
        r = data["repeat"]
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            self._problem(self._where("repeat"), "repeat", f"must be a whole number of at least 1, got {r!r}")
        else:
            self.repeat = r

    def _read_rows(self, data: dict[str, Any]) -> None:
        if "rows" not in data:
            return
        if not isinstance(data["rows"], str):
            self._problem(self._where("rows"), "rows", "must be the path of a CSV file")
        elif not (self.folder / data["rows"]).is_file():
            self._problem(self._where("rows"), "rows", f"CSV file not found: {data['rows']}")
        else:
            self.rows, self.rows_name = self.folder / data["rows"], data["rows"]

    def _read_jobs(self, doc: YamlDoc) -> None:
        jobs = doc.data.get("jobs")
        if jobs is None:
            return
        if not isinstance(jobs, list):
            self._problem(self._where("jobs"), "jobs", "must be a list of jobs (mappings of field: value)")
            return
        items = doc.item_lines("jobs")
        for i, job in enumerate(jobs):
            where = f"line {items[i][0]}" if i < len(items) else self._where("jobs")
            if not isinstance(job, dict):
                self._problem(where, "jobs", f"job {i + 1} must be a mapping of field: value, got {job!r}")
                continue
            values = {str(k): v for k, v in job.items()}
            self._check_values(values, {}, where)
            self.listed.append(Level(values, self.file, where, self.folder))

    def _check_values(self, values: dict[str, Any], lines: dict[str, int], where: str) -> None:
        """Report values that cannot be sent as JSON; each becomes ``Invalid``, so the jobs it is
        part of are not expanded."""
        for k, v in values.items():
            try:
                why = json_problem(v)
            except RecursionError:  # a YAML alias that contains itself
                why = "a value that contains itself cannot be sent"
            if why:
                values[k] = Invalid("")
                loc = f"line {lines[k]}" if k in lines else where if where.startswith("line") else self._where(where)
                self._problem(loc, k, why)

    # ---- the schema ----------------------------------------------------------------------------

    def _find_schema(self, schema_file: Path | None, model_given: bool) -> None:
        try:
            self.schema = find_schema(self.model_id, schema_file)
        except SchemaError as exc:
            self._problem(self._where("schema"), "schema", str(exc))
            self._fatal = True
        if self.schema is None or schema_file is None or not self.schema.model_id:
            return
        if not model_given:
            self.model_id = self.schema.model_id  # a schema file names its model
        elif self.schema.model_id != self.model_id:
            self._problem(self._where("schema"), "schema",
                          f"the schema file is for model '{self.schema.model_id}' but the manifest's model "
                          f"is '{self.model_id}'; use the matching schema or set model: {self.schema.model_id}")

    def use_schema(self, schema: ModelSchema | None) -> None:
        """Check against another schema (``validate --schema``) than the one the manifest found."""
        self.schema = schema
        self.images = ImageRefs(self.folder, self.image_base_url, schema_known=schema is not None)

    # ---- checks before expanding ---------------------------------------------------------------

    def check_workdir(self, workdir: Path) -> None:
        """Refuse a batch name taken by a file of the work directory the batch would run in: its
        outputs go to the folder ``workdir/<name>``."""
        folder = Path(workdir) / self.name
        if batch_name_problem(self.name) is None and os.path.lexists(folder) and not folder.is_dir():
            self._problem("" if self._batch_given else self._where("name"), "name",
                          f"batch name '{self.name}' is taken by the file {folder} in the work directory; "
                          "choose another name")

    def _check_size(self) -> None:
        """Refuse a manifest that expands to more than ``max_expand`` jobs, counted before
        anything is expanded: a matrix or a ``repeat`` multiplies, and a few lines can ask for
        more jobs than memory or a lifetime holds."""
        combos = math.prod(len(v) for v in self.matrix.values())
        per_job = combos * self.repeat
        parts = []
        if self.matrix:
            sizes = ", ".join(f"{k}: {len(v)}" for k, v in self.matrix.items())
            parts.append(f"{combos:,} matrix combinations ({sizes})")
        if self.repeat > 1:
            parts.append(f"repeat {self.repeat:,}")
        where = "matrix" if self.matrix else "repeat"
        if per_job > self.max_expand:
            self._problem(self._where(where), where, self.too_many(f"{per_job:,}", " x ".join(parts) + " for each job"))
            self._fatal = True
            return
        listed, rows = len(self.listed), 0
        if self.rows is not None and (listed + line_count(self.rows)) * per_job > self.max_expand:
            rows = row_count(self.rows)  # exactly, only when an upper bound says it may matter
        jobs = listed + rows
        if jobs * per_job > self.max_expand:
            written = " + ".join([*([f"{listed:,} jobs"] if listed else []), *([f"{rows:,} CSV rows"] if rows else [])])
            location = self._where(where if parts else "rows" if self.rows is not None else "jobs")
            self._problem(location, where if parts else "",
                          self.too_many(f"{jobs * per_job:,}", " x ".join([written, *parts])))
            self._fatal = True

    def too_many(self, count: str, how: str = "") -> str:
        how = f" ({how})" if how else ""
        return (f"the manifest expands to {count} jobs{how}, over the limit of {self.max_expand:,}; "
                "if you mean it, raise the limit with --max-expand N")

    # ---- expansion -----------------------------------------------------------------------------

    def iter_jobs(self) -> Iterator[JobSpec]:
        """Stream every job: jobs listed in the YAML, then CSV rows; each times every matrix
        combination, times ``repeat``. Duplicates (same key) are skipped and counted.

        Each pass starts its problems afresh, so iterating twice does not report twice."""
        self._met.clear()
        self._expansion = None
        if self._fatal:
            return
        self._expansion = Expansion(self, self._met)
        yield from self._expansion.jobs()
