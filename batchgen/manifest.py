"""Manifests: YAML or CSV files expanded into job specs. Pure and synchronous: no network.

A YAML manifest::

    name: street-scenes            # batch name (default: the file name)
    model: bytedance/dreamina-3-0/pro/image-to-video
    image_base_url: https://cdn.example.com/inputs   # where local images are published (real API)
    defaults: {frames: 121}
    rows: scenes.csv               # one job per CSV row ...
    jobs:                          # ... and/or jobs listed here
      - {prompt: "A fox in snow", image: images/fox.jpg}
    matrix: {seed: [1, 2]}         # every job x every combination
    repeat: 1

Expansion order: schema defaults of optional fields < ``defaults`` < the job or row < matrix
values; then ``repeat`` copies. String values may be templates (``"{subject}, golden hour"``)
drawing on every variable of the job. Problems are collected with file, row/line and field, never
raised one at a time, so a user sees them all at once.

The schema's defaults are applied here rather than in validation so that the job key covers them:
``frames: 121`` written out and ``frames`` left to its default are the same job.
"""

from __future__ import annotations

import csv
import hashlib
import ipaddress
import itertools
import json
import math
import os
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

from .constants import ALIAS_EXPANSION_RATIO, ALIAS_FREE_NODES, DEFAULT_MAX_EXPAND, DEFAULT_MODEL, WORKDIR_FILES
from .errors import ManifestError, Problem
from .inline import FileRef, sniff_mime
from .schema import ModelSchema, SchemaError, find_schema

TOP_KEYS = ("name", "model", "schema", "image_base_url", "defaults", "jobs", "rows", "matrix", "repeat")
# Friendly names for a model's one image field (Dreamina wants a one-item list `image_urls`).
IMAGE_ALIASES = ("image", "image_url", "image_urls", "images", "image_path")
# Without a schema, fields whose names look like these may hold local image paths.
_IMAGE_NAME = re.compile(r"(image|img)", re.IGNORECASE)
_BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Names Windows keeps for devices, with any extension: a folder cannot have them.
_DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10))}
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}
LIST_SEPARATOR = "|"  # several values in one CSV cell: "a.jpg|b.jpg"


@dataclass(frozen=True)
class JobSpec:
    """One job as expanded from a manifest, before it is recorded."""

    batch: str
    model_id: str
    key: str  # 16 hex chars: model + canonical inputs + repeat index
    seq: int  # position in the expanded manifest (duplicates skipped)
    source: str  # "quickstart.yaml, line 14" or "rows.csv, row 7"
    inputs: dict[str, Any]
    meta: dict[str, Any]
    local_files: dict[str, str] = field(default_factory=dict)  # input URL -> file on disk
    inputs_json: str | None = None  # the inputs in canonical JSON, as recorded (None: not made yet)


@dataclass
class _Level:
    """One layer of a job's values (defaults, a job or row, matrix values) and where it came from."""

    values: dict[str, Any]
    file: str  # display name of the file it came from
    location: str  # "line 12" / "row 3"
    folder: Path  # relative image paths in it are relative to this
    lines: dict[str, int] = field(default_factory=dict)  # key -> its line, for defaults and matrix
    csv: bool = False


def _close_matches(word: str, candidates: Sequence[str], n: int) -> list[str]:
    """difflib's suggestions, imported only when a manifest has a key to correct."""
    import difflib

    return difflib.get_close_matches(word, candidates, n=n)


# Canonical JSON (sorted keys, no spaces, text as is) for job keys and recorded inputs. One encoder
# for all: json.dumps with options builds a new one per call, which a 100,000-job manifest feels.
canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode


class _Invalid(str):
    """A CSV cell that failed its cast (already reported); it makes the job invalid."""


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader that keeps dates as text: a prompt or seed written 2024-05-01 stays a string
    (a date object could not be sent as JSON). LibYAML's parser when PyYAML has it: a manifest
    with long lists parses ten times faster."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


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
    if name.split(".")[0].upper() in _DEVICE_NAMES:
        return f"batch name '{name}' is a device name on Windows and cannot be a folder there; choose another name"
    return None


def is_image_name(name: str) -> bool:
    """Without a schema: whether a field's name says it holds an image (image_url, img_url, ...)."""
    return _IMAGE_NAME.search(name) is not None


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 and localhost: the only hosts plain http:// is allowed for."""
    if not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---- templates -------------------------------------------------------------------------------


class TemplateError(ValueError):
    """A template that cannot be rendered; ``missing`` names an undefined variable."""

    def __init__(self, message: str, missing: str | None = None):
        super().__init__(message)
        self.missing = missing


@lru_cache(maxsize=4096)
def _parse_template(text: str) -> tuple[tuple[str, str | None, str | None, str | None], ...] | str | None:
    """The parts of a template, None for plain text, or the syntax error as a string. Cached:
    the same template (from defaults) is used by every row."""
    if "{" not in text and "}" not in text:
        return None
    try:
        parts = tuple(string.Formatter().parse(text))
    except ValueError as exc:
        return f"bad template ({exc}); write {{{{ and }}}} for literal braces"
    for _, name, _, _ in parts:
        if name is not None and (name == "" or "." in name or "[" in name):
            return (f"bad template field {{{name}}}: use a plain name such as {{subject}}; "
                    "write {{ and }} for literal braces")
    return parts


def template_names(value: Any) -> set[str]:
    """Variables a value (a string, or a list of them) uses."""
    if isinstance(value, list):
        return set().union(*(template_names(v) for v in value)) if value else set()
    if not isinstance(value, str):
        return set()
    parts = _parse_template(value)
    if not isinstance(parts, tuple):
        return set()
    return {name for _, name, _, _ in parts if name}


def _plain_texts(values: list[Any]) -> bool:
    """True for a list of strings without braces (a list of image URLs): nothing to render."""
    for v in values:
        if type(v) is not str or "{" in v or "}" in v:
            return False
    return True


def render(value: Any, variables: dict[str, Any]) -> Any:
    """``value`` with every ``{name}`` replaced (format specs such as ``{seed:04d}`` work)."""
    if isinstance(value, list):
        return [render(v, variables) for v in value]
    if not isinstance(value, str):
        return value
    parts = _parse_template(value)
    if parts is None:
        return value
    if isinstance(parts, str):
        raise TemplateError(parts)
    out = []
    for literal, name, spec, conversion in parts:
        out.append(literal)
        if name is None:
            continue
        if name not in variables:
            raise TemplateError(f"template uses {{{name}}}, which this job does not define", missing=name)
        v = variables[name]
        if conversion == "r":
            v = repr(v)
        elif conversion in ("s", "a"):
            v = str(v) if conversion == "s" else ascii(v)
        try:
            out.append(format(v, spec or ""))
        except (ValueError, TypeError) as exc:
            raise TemplateError(f"template {{{name}:{spec}}} cannot format {v!r}: {exc}") from exc
    return "".join(out)


def _json_problem(value: Any) -> str | None:
    """Why ``value`` cannot be sent as JSON, if it cannot."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a number JSON can carry"
    if isinstance(value, list):
        return next((p for p in map(_json_problem, value) if p), None)
    if isinstance(value, dict):
        return next((p for p in map(_json_problem, value.values()) if p), None)
    return f"a {type(value).__name__} value cannot be sent; quote it to make it text"


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
        self.duplicates = 0
        self.bad_refs: set[str] = set()  # image references already reported as unusable
        self._load_problems: list[Problem] = []
        self._iter_problems: list[Problem] = []
        self._seen_problems: set[Problem] = set()
        self._reported: set[tuple[str, str, str]] = set()  # (file, column, kind) reported once
        self._fatal = False  # nothing can be expanded (unreadable file, bad YAML, bad schema)
        self._lines: dict[str, int] = {}
        self._sub_lines: dict[str, dict[str, int]] = {"defaults": {}, "matrix": {}}
        self._jobs: list[_Level] = []
        self._rows: Path | None = None
        self._rows_name = ""
        self._hashes: dict[Path, FileRef] = {}
        self._resolved: dict[tuple[str, Path], tuple[str, Path | None] | str | None] = {}
        given_name: str | None = None
        model_given = False
        schema_file = Path(schema_path) if schema_path else None

        suffix = self.path.suffix.lower()
        if suffix == ".csv":
            self._rows, self._rows_name = self.path, self.file
        elif suffix in (".yaml", ".yml"):
            given_name, model_given, yaml_schema = self._load_yaml()
            schema_file = schema_file or yaml_schema
        else:
            self._problem("", "", f"unsupported manifest type '{self.path.suffix}'; use .yaml, .yml or .csv")
            self._fatal = True

        self._batch_given = batch is not None
        self.name = batch if batch is not None else given_name or self._name_from_file()
        why = batch_name_problem(self.name)
        if why:
            self._problem(self._where("name") if batch is None else "", "name", why)
        try:
            self.schema = find_schema(self.model_id, schema_file)
        except SchemaError as exc:
            self._problem(self._where("schema"), "schema", str(exc))
            self._fatal = True
        if self.schema is not None and schema_file is not None and self.schema.model_id:
            if not model_given:
                self.model_id = self.schema.model_id  # a schema file names its model
            elif self.schema.model_id != self.model_id:
                self._problem(self._where("schema"), "schema",
                              f"the schema file is for model '{self.schema.model_id}' but the manifest's model "
                              f"is '{self.model_id}'; use the matching schema or set model: {self.schema.model_id}")
        self._image_fields = self.schema.image_fields() if self.schema else {}
        self._other_media = self.schema.other_media_fields() if self.schema else {}
        if not self._fatal:
            self._check_size()

    # ---- problems ------------------------------------------------------------------------------

    @property
    def problems(self) -> list[Problem]:
        return self._load_problems + self._iter_problems

    def raise_problems(self) -> None:
        if self.problems:
            raise ManifestError(self.problems)

    def _problem(self, location: str, field_name: str, message: str, file: str | None = None) -> None:
        self._load_problems.append(Problem(file or self.file, location, field_name, message))

    def location_of(self, key: str) -> str:
        """Where a top-level key of a YAML manifest is ("line 3"), "" if not written there."""
        return self._where(key)

    def _where(self, key: str) -> str:
        return f"line {self._lines[key]}" if key in self._lines else ""

    def _name_from_file(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.path.stem).strip("-._") or "batch"

    # ---- loading -------------------------------------------------------------------------------

    def _load_yaml(self) -> tuple[str | None, bool, Path | None]:
        """Read the YAML file's keys; return (name, whether model was given, schema file)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._problem("", "", "file not found")
            self._fatal = True
            return None, False, None
        except UnicodeDecodeError:
            self._problem("", "", "not UTF-8 text")
            self._fatal = True
            return None, False, None
        except OSError as exc:
            self._problem("", "", f"cannot read: {exc.strerror or exc}")
            self._fatal = True
            return None, False, None
        try:
            loader = _Loader(text)  # checks for unprintable characters already
            try:
                root = loader.get_single_node()
                # Aliases are checked before any value is built: PyYAML shares an aliased value
                # rather than copying it, but every later walk (checks, job keys) would not.
                bomb = _alias_bomb(root) if root is not None and "&" in text and "*" in text else None
                if bomb is not None:
                    self._problem(*bomb)
                    self._fatal = True
                    return None, False, None
                data = loader.construct_document(root) if root is not None else {}
            finally:
                loader.dispose()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else ""
            if isinstance(exc, yaml.reader.ReaderError):
                where = f"line {text.count(chr(10), 0, exc.position) + 1}"
            self._problem(where, "", f"not valid YAML: {getattr(exc, 'problem', None) or getattr(exc, 'reason', exc)}")
            self._fatal = True
            return None, False, None
        if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode | type(None)):
            self._problem("", "", "the manifest must be a mapping of keys (" + ", ".join(TOP_KEYS) + ")")
            self._fatal = True
            return None, False, None
        nodes: dict[str, yaml.Node] = {}
        if isinstance(root, yaml.MappingNode):
            self._check_duplicate_keys(root)
            for k, v in root.value:
                self._lines[str(k.value)] = k.start_mark.line + 1
                nodes[str(k.value)] = v
        for key in data:
            if key not in TOP_KEYS:
                close = _close_matches(str(key), TOP_KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self._problem(self._where(str(key)), str(key), f"unknown key{hint}; allowed: {', '.join(TOP_KEYS)}")

        name: str | None = None
        if "name" in data:
            if isinstance(data["name"], str | int) and not isinstance(data["name"], bool):
                name = str(data["name"])
            else:
                self._problem(self._where("name"), "name", "must be a string")
        model_given = False
        if "model" in data:
            if isinstance(data["model"], str) and data["model"].strip().strip("/"):
                self.model_id = data["model"].strip().strip("/")
                model_given = True
            else:
                self._problem(self._where("model"), "model", "must be a model id such as " + DEFAULT_MODEL)
        schema_file: Path | None = None
        if "schema" in data:
            if not isinstance(data["schema"], str):
                self._problem(self._where("schema"), "schema", "must be the path of a schema file")
            elif not (self.folder / data["schema"]).is_file():
                self._problem(self._where("schema"), "schema", f"schema file not found: {data['schema']}")
                self._fatal = True
            else:
                schema_file = self.folder / data["schema"]
        if "image_base_url" in data:
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
        if "defaults" in data:
            if isinstance(data["defaults"], dict):
                self.defaults = {str(k): v for k, v in data["defaults"].items()}
                self._sub_lines["defaults"] = self._key_lines(nodes.get("defaults"))
                self._check_values(self.defaults, self._sub_lines["defaults"], "defaults")
            elif data["defaults"] is not None:
                self._problem(self._where("defaults"), "defaults", "must be a mapping of field: value")
        if "matrix" in data:
            m = data["matrix"]
            if not isinstance(m, dict) or not m:
                self._problem(self._where("matrix"), "matrix", "must be a mapping of field: [values, ...]")
            else:
                lines = self._sub_lines["matrix"] = self._key_lines(nodes.get("matrix"))
                for k, v in m.items():
                    where = f"line {lines.get(str(k), self._lines.get('matrix', 0))}"
                    if not isinstance(v, list) or not v:
                        self._problem(where, f"matrix.{k}", "must be a non-empty list of values")
                    else:
                        self.matrix[str(k)] = v
                self._check_values(self.matrix, lines, "matrix")
                self.matrix = {k: v for k, v in self.matrix.items() if not isinstance(v, _Invalid)}
        if "repeat" in data:
            r = data["repeat"]
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                self._problem(self._where("repeat"), "repeat", f"must be a whole number of at least 1, got {r!r}")
            else:
                self.repeat = r
        if "rows" in data:
            if not isinstance(data["rows"], str):
                self._problem(self._where("rows"), "rows", "must be the path of a CSV file")
            elif not (self.folder / data["rows"]).is_file():
                self._problem(self._where("rows"), "rows", f"CSV file not found: {data['rows']}")
            else:
                self._rows, self._rows_name = self.folder / data["rows"], data["rows"]
        if "jobs" in data:
            self._load_jobs(data["jobs"], nodes.get("jobs"))
        if "jobs" not in data and "rows" not in data:
            self._problem("", "jobs", "the manifest has no jobs: add a 'jobs' list or 'rows: file.csv'")
        return name, model_given, schema_file

    def _load_jobs(self, jobs: Any, node: yaml.Node | None) -> None:
        if jobs is None:
            return
        if not isinstance(jobs, list):
            self._problem(self._where("jobs"), "jobs", "must be a list of jobs (mappings of field: value)")
            return
        items = node.value if isinstance(node, yaml.SequenceNode) else []
        for i, job in enumerate(jobs):
            item = items[i] if i < len(items) else None
            where = f"line {item.start_mark.line + 1}" if item is not None else self._where("jobs")
            if not isinstance(job, dict):
                self._problem(where, "jobs", f"job {i + 1} must be a mapping of field: value, got {job!r}")
                continue
            if isinstance(item, yaml.MappingNode):
                self._check_duplicate_keys(item)
            values = {str(k): v for k, v in job.items()}
            self._check_values(values, {}, where)
            self._jobs.append(_Level(values, self.file, where, self.folder))

    def _key_lines(self, node: yaml.Node | None) -> dict[str, int]:
        if not isinstance(node, yaml.MappingNode):
            return {}
        self._check_duplicate_keys(node)
        return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}

    def _check_duplicate_keys(self, node: yaml.MappingNode) -> None:
        # PyYAML keeps the last of two equal keys without a word; the user surely meant one.
        seen: dict[str, int] = {}
        for k, _ in node.value:
            name, line = str(k.value), k.start_mark.line + 1
            if name in seen:
                self._problem(f"line {line}", name, f"appears twice (also on line {seen[name]}); keep one")
            seen[name] = line

    def _check_values(self, values: dict[str, Any], lines: dict[str, int], where: str) -> None:
        for k, v in values.items():
            try:
                why = _json_problem(v)
            except RecursionError:  # a YAML alias that contains itself
                why = "a value that contains itself cannot be sent"
            if why:
                values[k] = _Invalid("")  # reported here; the jobs it is part of are not expanded
                loc = f"line {lines[k]}" if k in lines else where if where.startswith("line") else self._where(where)
                self._problem(loc, k, why)

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
        limit = self.max_expand
        combos = math.prod(len(v) for v in self.matrix.values())
        per_job = combos * self.repeat
        parts = []
        if self.matrix:
            sizes = ", ".join(f"{k}: {len(v)}" for k, v in self.matrix.items())
            parts.append(f"{combos:,} matrix combinations ({sizes})")
        if self.repeat > 1:
            parts.append(f"repeat {self.repeat:,}")
        where = "matrix" if self.matrix else "repeat"
        if per_job > limit:
            how = " x ".join(parts) + " for each job"
            self._problem(self._where(where), where, self._too_many(f"{per_job:,}", how))
            self._fatal = True
            return
        listed, rows = len(self._jobs), 0
        if self._rows is not None and (listed + _line_count(self._rows)) * per_job > limit:
            rows = _row_count(self._rows)  # exactly, only when an upper bound says it may matter
        jobs = listed + rows
        if jobs * per_job > limit:
            written = " + ".join([*([f"{listed:,} jobs"] if listed else []), *([f"{rows:,} CSV rows"] if rows else [])])
            location = self._where(where if parts else "rows" if self._rows is not None else "jobs")
            self._problem(location, where if parts else "", self._too_many(f"{jobs * per_job:,}",
                                                                            " x ".join([written, *parts])))
            self._fatal = True

    def _too_many(self, count: str, how: str = "") -> str:
        how = f" ({how})" if how else ""
        return (f"the manifest expands to {count} jobs{how}, over the limit of {self.max_expand:,}; "
                "if you mean it, raise the limit with --max-expand N")

    def use_schema(self, schema: ModelSchema | None) -> None:
        """Check against another schema (``validate --schema``) than the one the manifest found."""
        self.schema = schema
        self._image_fields = schema.image_fields() if schema else {}
        self._other_media = schema.other_media_fields() if schema else {}

    # ---- CSV rows ------------------------------------------------------------------------------

    def _csv_levels(self) -> Iterator[_Level]:
        assert self._rows is not None
        path, name = self._rows, self._rows_name
        folder = path.resolve().parent
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            self._add(Problem(name, "", "", f"cannot read: {exc.strerror or exc}"))
            return
        with fh:
            reader = csv.reader(_decoded_lines(fh))
            rowno = 0
            header: list[str] = []
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except _NotText as exc:
                    self._add(Problem(name, f"line {exc.lineno}", "", f"not UTF-8 text ({exc.reason}); save the "
                                      "file as UTF-8 (spreadsheets call it 'CSV UTF-8')"))
                    return
                except csv.Error as exc:
                    self._add(Problem(name, f"row {rowno + 1}", "", f"not valid CSV: {exc}"))
                    return
                rowno += 1
                if rowno == 1:
                    header = [h.strip() for h in row]
                    if not self._check_header(header, name):
                        return
                    continue
                if not any(cell.strip() for cell in row):
                    continue  # a blank line
                if len(row) > len(header):
                    self._add(Problem(name, f"row {rowno}", "",
                                                       f"{len(row)} cells but the header has {len(header)} columns"))
                    continue
                values: dict[str, Any] = {}
                for col, cell in zip(header, row, strict=False):
                    cell = cell.strip()
                    if cell and col:
                        values[col] = self._cast(col, cell, name, rowno)
                    elif cell:
                        self._once(name, "", "unnamed", f"row {rowno}",
                                   "a column without a header holds values; name it, or prefix it with _ "
                                   "to keep it as a note")
                yield _Level(values, name, f"row {rowno}", folder, csv=True)
            if rowno == 0:
                self._add(Problem(name, "", "", "the CSV file is empty (it needs a header row)"))

    def _check_header(self, header: list[str], name: str) -> bool:
        if not any(header):
            self._add(Problem(name, "row 1", "", "the header row is empty"))
            return False
        seen: set[str] = set()
        for h in header:
            if h and h in seen:
                self._add(Problem(name, "row 1", h, "column appears twice"))
                return False
            seen.add(h)
        return True

    def _once(self, file: str, column: str, kind: str, location: str, message: str) -> None:
        """A problem about a whole column, reported at the first row it shows in, not every row."""
        if (file, column, kind) not in self._reported:
            self._reported.add((file, column, kind))
            self._add(Problem(file, location, column, message))

    def _cast(self, col: str, cell: str, file: str, rowno: int) -> Any:
        """A CSV cell as the type its field wants (the schema says integer, number, boolean, list)."""
        schema = self.schema
        if schema is None or col not in schema.properties:
            return cell
        t = schema.field_type(col)
        if t == "array":
            items = [v.strip() for v in cell.split(LIST_SEPARATOR) if v.strip()]
            cast = [self._cast_one(schema.item_type(col), v, col, file, rowno) for v in items]
            return _Invalid(cell) if any(isinstance(v, _Invalid) for v in cast) else cast
        return self._cast_one(t, cell, col, file, rowno)

    def _cast_one(self, t: str | None, cell: str, col: str, file: str, rowno: int) -> Any:
        try:
            if t == "integer":
                return int(cell)
            if t == "number":
                value = float(cell)
                if not math.isfinite(value):
                    raise ValueError(cell)
                return value
            if t == "boolean":
                low = cell.lower()
                if low in ("true", "yes", "1"):
                    return True
                if low in ("false", "no", "0"):
                    return False
                raise ValueError(cell)
        except ValueError:
            wanted = {"integer": "a whole number", "number": "a number", "boolean": "true or false"}[t or ""]
            self._add(Problem(file, f"row {rowno}", col, f"'{cell}' is not {wanted}"))
            return _Invalid(cell)
        return cell

    # ---- expansion -----------------------------------------------------------------------------

    def iter_jobs(self) -> Iterator[JobSpec]:
        """Stream every job: jobs listed in the YAML, then CSV rows; each times every matrix
        combination, times ``repeat``. Duplicates (same key) are skipped and counted.

        Each pass starts its problems afresh, so iterating twice does not report twice."""
        self._iter_problems = []
        self._seen_problems = set()
        self._reported = set()
        self.duplicates = 0
        if self._fatal:
            return
        seen: set[str] = set()
        seq = 0
        self._model_json = canonical_json(self.model_id)  # part of every job's key (_expand)
        defaults = self._normalize(self.defaults, self._top_level("defaults"))
        matrix_level = self._top_level("matrix")
        # A matrix without an image field has nothing to normalize (most matrices: seeds, sizes).
        normalize = self._normalize if self._image_keys(self.matrix) else lambda values, _level: values
        combos = [(combo, normalize(combo, matrix_level))
                  for combo in (dict(zip(self.matrix, values, strict=True))
                                for values in itertools.product(*self.matrix.values()))]
        levels: Iterator[_Level] = iter(self._jobs)
        if self._rows is not None:
            levels = itertools.chain(levels, self._csv_levels())
        per_level = (len(combos) or 1) * self.repeat
        made = 0
        for level in levels:
            # A backstop: _check_size counted the jobs before, unless the CSV file grew since.
            made += per_level
            if made > self.max_expand:
                self._add(Problem(level.file, level.location, "", self._too_many(f"more than {self.max_expand:,}")))
                return
            own = self._normalize(level.values, level)
            for raw_combo, combo in combos or [({}, {})]:
                for rep in range(self.repeat):
                    spec = self._expand(level, defaults, own, raw_combo, combo, rep, seq)
                    if spec is None:
                        break  # its problem is recorded; the other copies would repeat it
                    if spec.key in seen:
                        self.duplicates += 1
                        continue
                    seen.add(spec.key)
                    seq += 1
                    yield spec

    def _top_level(self, key: str) -> _Level:
        return _Level({}, self.file, self._where(key), self.folder, lines=self._sub_lines.get(key, {}))

    def _add(self, problem: Problem) -> None:
        # Matrix and repeat copies of a job meet the same problem at the same place: once is enough.
        if problem not in self._seen_problems:
            self._seen_problems.add(problem)
            self._iter_problems.append(problem)

    def _at(self, level: _Level, field_name: str, message: str, *, once: bool = False) -> None:
        """A problem with ``field_name`` of ``level``; ``once``: per file and field, not per row."""
        loc = f"line {level.lines[field_name]}" if field_name in level.lines else level.location
        if once:
            self._once(level.file, field_name, message, loc, message)
        else:
            self._add(Problem(level.file, loc, field_name, message))

    def _image_keys(self, values: dict[str, Any]) -> list[str]:
        """The keys of ``values`` that give the model's one image field (itself or an alias)."""
        if self.schema is None or len(self._image_fields) != 1:
            return []
        target = next(iter(self._image_fields))
        properties = self.schema.properties
        return [k for k in values if k == target or (k in IMAGE_ALIASES and k not in properties)]

    def _normalize(self, values: dict[str, Any], level: _Level) -> dict[str, Any]:
        """``values`` with an image alias ('image', 'image_url', ...) moved onto the model's one
        image field, as a list when it wants one ('a.jpg|b.jpg' for several)."""
        given = self._image_keys(values)
        if not given:
            return values
        target, is_list = next(iter(self._image_fields.items()))
        if len(given) > 1:
            self._at(level, given[0], f"the image is given twice ({', '.join(given)}); use one", once=level.csv)
        out = {k: v for k, v in values.items() if k not in given}
        out[target] = _listify(values[given[0]], is_list)
        return out

    def _expand(self, level: _Level, defaults: dict[str, Any], own: dict[str, Any], raw_combo: dict[str, Any],
                combo: dict[str, Any], rep: int, seq: int) -> JobSpec | None:
        schema = self.schema
        merged = {**defaults, **own, **combo}
        if schema is not None:
            merged = schema.apply_defaults(merged)

        # Templates: every variable of the job may be used; a missing one is a problem.
        rendered: dict[str, Any] = {}
        used: set[str] = set()
        broken = False
        for k, v in merged.items():
            # Plain text and plain values (most of a large matrix) need no template work.
            if isinstance(v, str):
                if "{" not in v and "}" not in v:
                    rendered[k] = v
                    continue
            elif not isinstance(v, list):
                rendered[k] = v
                continue
            elif _plain_texts(v):
                rendered[k] = list(v)  # a copy, as rendering makes: no two jobs share a list
                continue
            used |= template_names(v)
            try:
                rendered[k] = render(v, merged)
            except TemplateError as exc:
                message = str(exc)
                if exc.missing is not None:
                    message += f"; defined: {', '.join(sorted(merged))}"
                # A template from the defaults that no row can fill is reported once, not per row.
                self._at(level, k, message, once=level.csv and k not in own)
                broken = True

        inputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for k, v in rendered.items():
            if k.startswith("_"):
                meta[k] = v
            elif schema is None or k in schema.properties:
                inputs[k] = v
            elif k in used:
                meta[k] = v  # a template-only variable: kept for reports, not sent
            else:
                self._unknown(k, level, own, combo)

        local_files, key_inputs = self._resolve_images(inputs, level, own, combo)
        if broken or any(isinstance(v, _Invalid) for v in merged.values()):
            # A template that cannot be filled, a cell that did not cast, a value that cannot be
            # sent: reported, with the job's other problems found above; but a job with a value
            # nobody meant is not worth checking further.
            return None
        if self.matrix:
            meta["matrix"] = dict(raw_combo)
        if self.repeat > 1:
            meta["repeat"] = rep
        # The key hashes {"inputs": ..., "model": ..., "repeat": ...} in canonical JSON (sorted keys,
        # no spaces). It is written out by hand around the inputs' own canonical JSON, which is
        # also what gets recorded: one encoding per job instead of three. Keys already recorded
        # depend on this exact text: test_manifest pins it.
        inputs_json = canonical_json(inputs)
        key_json = inputs_json if key_inputs is inputs else canonical_json(key_inputs)
        canonical = f'{{"inputs":{key_json},"model":{self._model_json},"repeat":{rep}}}'
        key = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        return JobSpec(self.name, self.model_id, key, seq, f"{level.file}, {level.location}", inputs, meta,
                       local_files, inputs_json)

    def _unknown(self, k: str, level: _Level, own: dict[str, Any], combo: dict[str, Any]) -> None:
        """Report a key that is no field of the model, where it was written, once."""
        assert self.schema is not None
        fields = list(self.schema.properties)
        close = _close_matches(k, fields + list(IMAGE_ALIASES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        aliases = ""
        if len(self._image_fields) == 1:
            target = next(iter(self._image_fields))
            aliases = f"or image / image_url for {target}; "
        allowed = f"allowed: {', '.join(fields)} ({aliases}or prefix it with _ to keep it as a note)"
        if k in own:
            what = "column" if level.csv else "field"
            self._at(level, k, f"unknown {what} '{k}'{hint}; {allowed}", once=level.csv)
        else:
            origin = self._top_level("matrix" if k in combo else "defaults")
            self._at(origin, k, f"unknown field '{k}'{hint}; {allowed}")

    # ---- images --------------------------------------------------------------------------------

    def _resolve_images(self, inputs: dict[str, Any], level: _Level, own: dict[str, Any],
                        combo: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
        """Turn image references in ``inputs`` (in place) into what is sent; return the local files
        behind them and the inputs as the key sees them (a local file by its content)."""
        local_files: dict[str, str] = {}
        key_inputs = inputs
        fields = [*self._image_fields, *self._other_media] if self.schema is not None else [
            k for k in inputs if is_image_name(k)]
        for fname in fields:
            value = inputs.get(fname)
            if value is None:
                continue
            # Relative paths are relative to the file that wrote them: a row's to its CSV.
            folder = level.folder if fname in own and fname not in combo else self.folder
            refs = value if isinstance(value, list) else [value]
            sent, keyed = [], []
            for ref in refs:
                res = self._resolve(ref, folder) if isinstance(ref, str) else None
                if isinstance(res, str):
                    self._at(level, fname, res)
                    self.bad_refs.add(ref)
                if not isinstance(res, tuple):
                    sent.append(ref)
                    keyed.append(ref)
                    continue
                url, path = res
                if path is None:
                    sent.append(url)
                    keyed.append(url)
                    continue
                facts = self._file_facts(path)
                if facts is None:
                    self._at(level, fname, f"cannot read local file {ref}")
                    self.bad_refs.add(url)
                    sent.append(url)
                    keyed.append("sha256:None")
                    continue
                if url.startswith("file://"):
                    # Sent inline at submit time; recorded with what it was when validated.
                    url = facts.uri
                sent.append(url)
                local_files[url] = str(path)
                keyed.append(f"sha256:{facts.sha256}")
            inputs[fname] = sent if isinstance(value, list) else sent[0]
            if keyed != sent or key_inputs is not inputs:  # a local file: keyed by its content
                if key_inputs is inputs:
                    key_inputs = dict(inputs)
                key_inputs[fname] = keyed if isinstance(value, list) else keyed[0]
        return local_files, key_inputs

    def _resolve(self, ref: str, folder: Path) -> tuple[str, Path | None] | str | None:
        """(value to send, local file or None), a problem as a string, or None to leave the value
        alone (without a schema, a value that does not look like an image). Cached: thousands of
        rows name the same few images."""
        cache_key = (ref, folder)
        if cache_key not in self._resolved:
            self._resolved[cache_key] = self._resolve_uncached(ref, folder)
        return self._resolved[cache_key]

    def _resolve_uncached(self, ref: str, folder: Path) -> tuple[str, Path | None] | str | None:
        if ref.startswith("data:"):
            return ref, None  # the file itself, written inline: validation decodes its header
        parts = urlsplit(ref)
        if parts.scheme in ("http", "https"):
            if not parts.netloc:
                return f"{ref}: not a complete URL"
            if parts.scheme == "http" and not is_loopback_host(parts.hostname):
                return f"{ref}: plain http is allowed only for loopback addresses; use https://"
            return ref, None
        if parts.scheme and len(parts.scheme) > 1 and parts.scheme != "file":  # one letter: a Windows drive
            return f"{ref}: unsupported scheme '{parts.scheme}'; use an https:// URL or a local file path"
        raw = parts.path if parts.scheme == "file" else ref
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = folder / path
        path = path.resolve()
        if not path.is_file():
            if self.schema is None and parts.scheme != "file" and path.suffix.lower() not in _IMAGE_SUFFIXES:
                return None  # no schema says this is an image; it is probably just text
            return f"local image not found: {ref} (looked for {path})"
        if self.image_base_url:
            try:
                rel = path.relative_to(self.folder)
            except ValueError:
                return (f"{ref} is outside the manifest's folder, so image_base_url cannot say where it is "
                        "published; move it under the manifest's folder")
            return self.image_base_url + "/" + "/".join(quote(p) for p in rel.parts), path
        return path.as_uri(), path

    def _file_facts(self, path: Path) -> FileRef | None:
        """sha256 (a local file's identity in the job key), size and type of a local file, once
        per file; None if it cannot be read."""
        facts = self._hashes.get(path)
        if facts is None:
            h = hashlib.sha256()
            size = 0
            try:
                with open(path, "rb") as fh:
                    head = fh.read(1 << 20)
                    block = head
                    while block:
                        h.update(block)
                        size += len(block)
                        block = fh.read(1 << 20)
            except OSError:
                return None
            facts = self._hashes[path] = FileRef(str(path), h.hexdigest(), size, sniff_mime(head[:64]))
        return facts


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif"}


class _NotText(Exception):
    def __init__(self, lineno: int, reason: str):
        super().__init__(reason)
        self.lineno, self.reason = lineno, reason


def _decoded_lines(fh: Any) -> Iterator[str]:
    """A binary file's lines as text, decoded one by one so that a bad byte is reported with
    its line (a whole-file decoder would fail at some block boundary instead)."""
    for lineno, raw in enumerate(fh, 1):
        try:
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise _NotText(lineno, exc.reason) from None


def _line_count(path: Path) -> int:
    """An upper bound of a CSV file's data rows, fast (a quoted cell may span lines)."""
    lines, last = 0, b"\n"
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                lines += block.count(b"\n")
                last = block[-1:]
    except OSError:
        return 0  # reported when the rows are read
    return max(0, lines + (last != b"\n") - 1)  # less the header


def _row_count(path: Path) -> int:
    """A CSV file's data rows, blank lines left out, read as iter_jobs reads them (without
    casting or expanding anything). What cannot be read counts as the rows before it: the
    reading itself reports it."""
    rows = -1  # the header
    try:
        with open(path, "rb") as fh:
            for row in csv.reader(_decoded_lines(fh)):
                if rows < 0 or any(cell.strip() for cell in row):
                    rows += 1
    except (OSError, csv.Error, _NotText):
        pass
    return max(0, rows)


def _alias_bomb(root: yaml.Node) -> tuple[str, str, str] | None:
    """(location, field, message) when YAML aliases expand the document beyond what its
    written size justifies (a "billion laughs": nine lines asking for 387 million values).

    Counts each node's size with its aliases expanded, each distinct node once (sizes are
    remembered), so it costs the nodes written, not the nodes meant. A node that contains itself
    counts once here; building its value reports it."""
    sizes: dict[int, int] = {}
    nodes: dict[int, yaml.Node] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        kids = _children(node)
        if children_done:
            sizes[key] = 1 + sum(sizes.get(id(k), 1) for k in kids)
            continue
        if key in nodes:
            continue
        nodes[key] = node
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in nodes)
    expanded = sizes[id(root)]
    limit = max(ALIAS_FREE_NODES, ALIAS_EXPANSION_RATIO * len(nodes))
    if expanded <= limit:
        return None
    # Point at the smallest value over the limit: where the aliases cross it.
    size, node = min(((sizes[k], n) for k, n in nodes.items() if sizes[k] > limit), key=lambda sn: sn[0])
    return (f"line {node.start_mark.line + 1}", "",
            f"YAML aliases (*name) expand the file to {expanded:,} values from {len(nodes):,} written "
            f"(this one alone to {size:,}); at most {limit:,} are allowed: write the values out, or use "
            "defaults, matrix or repeat")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _listify(value: Any, is_list: bool) -> Any:
    """A string for a list field becomes a list ('a.jpg|b.jpg' for several); a one-item list for a
    single-URL field becomes its item."""
    if is_list and isinstance(value, str):
        return [v.strip() for v in value.split(LIST_SEPARATOR) if v.strip()]
    if not is_list and isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def load_manifest(path: str | Path, batch: str | None = None, schema_path: str | Path | None = None,
                  max_expand: int = DEFAULT_MAX_EXPAND) -> Manifest:
    """Load a manifest (YAML or CSV by extension). What is wrong with it is in ``problems``, filled
    further by ``iter_jobs()``; validate.py reports them all together."""
    path = Path(path)
    if not path.exists():
        raise ManifestError([Problem(str(path), "", "", "file not found")])
    return Manifest(path, batch=batch, schema_path=schema_path, max_expand=max_expand)
