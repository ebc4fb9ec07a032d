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
"""

from __future__ import annotations

import csv
import functools
import hashlib
import ipaddress
import itertools
import json
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

from .constants import DEFAULT_MODEL
from .errors import ManifestError, Problem
from .schema import ModelSchema, SchemaError, find_schema

TOP_KEYS = ("name", "model", "schema", "image_base_url", "defaults", "jobs", "rows", "matrix", "repeat")
# Friendly column names for a model's image field (Dreamina wants a one-item list `image_urls`).
IMAGE_ALIASES = ("image", "image_url", "image_urls", "images", "image_path")
_BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


@dataclass(frozen=True)
class JobSpec:
    """One job as expanded from a manifest, before it is recorded."""

    batch: str
    model_id: str
    key: str  # 16 hex chars: model + canonical inputs + repeat index
    seq: int  # position in the expanded manifest
    source: str  # "quickstart.yaml, line 14" or "rows.csv, row 7"
    inputs: dict[str, Any]
    meta: dict[str, Any]
    local_files: dict[str, str] = field(default_factory=dict)  # input URL -> file on disk


@dataclass
class _Base:
    """A job before matrix and repeat: from the YAML list or a CSV row."""

    values: dict[str, Any]
    file: str  # display name of the file it came from
    location: str  # "line 12" / "row 3"
    folder: Path  # relative paths in it are relative to this


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _template_names(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return _string_template_names(value) if "{" in value else frozenset()
    names: set[str] = set()
    if isinstance(value, list):
        for v in value:
            names |= _template_names(v)
    return frozenset(names)


@functools.lru_cache(maxsize=4096)
def _string_template_names(value: str) -> frozenset[str]:
    names: set[str] = set()
    if "{" in value:
        try:
            for _, name, _, _ in string.Formatter().parse(value):
                if name:
                    names.add(re.split(r"[.\[]", name, maxsplit=1)[0])
        except ValueError:
            pass
    return frozenset(names)


class Manifest:
    """A loaded manifest. ``problems`` holds what is wrong with its structure; ``iter_jobs()``
    streams the expanded jobs and adds the problems it meets on the way."""

    def __init__(self, path: Path, *, batch: str | None = None, schema_path: Path | None = None):
        self.path = Path(path)
        self.file = self.path.name
        self.folder = self.path.resolve().parent
        self.problems: list[Problem] = []
        self.duplicates = 0
        self.bad_refs: set[str] = set()  # image references already reported as unusable
        self.model_id = DEFAULT_MODEL
        self.image_base_url: str | None = None
        self.defaults: dict[str, Any] = {}
        self.matrix: dict[str, list[Any]] = {}
        self.repeat = 1
        self._jobs: list[_Base] = []
        self._rows: Path | None = None
        self._schema_file: Path | None = Path(schema_path) if schema_path else None
        self.schema: ModelSchema | None = None
        self._hash_cache: dict[Path, str] = {}
        self._resolved: dict[tuple[Path, str], tuple[str, Path | None] | None] = {}

        if self.path.suffix.lower() == ".csv":
            self._rows = self.path
        elif self.path.suffix.lower() in (".yaml", ".yml"):
            self._load_yaml()
        else:
            self._problem("", "", f"unsupported manifest type '{self.path.suffix}'; use .yaml, .yml or .csv")
        self.name = batch if batch is not None else self._default_name()
        if not _BATCH_NAME.match(self.name):
            self._problem("", "name", f"batch name '{self.name}' is not allowed; use letters, digits, "
                          "'.', '_' and '-' (it becomes a folder name)")
        try:
            self.schema = find_schema(self.model_id, self._schema_file)
        except SchemaError as exc:
            self._problem("", "schema", str(exc))

    # ---- loading -------------------------------------------------------------------------------

    def _problem(self, location: str, field_name: str, message: str, file: str | None = None) -> None:
        self.problems.append(Problem(file or self.file, location, field_name, message))

    def _default_name(self) -> str:
        if getattr(self, "_name", None):
            return self._name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.path.stem).strip("-.") or "batch"

    def _load_yaml(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._problem("", "", "file not found")
            return
        except (OSError, UnicodeDecodeError) as exc:
            self._problem("", "", f"cannot read: {exc}")
            return
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else ""
            self._problem(where, "", f"not valid YAML: {getattr(exc, 'problem', None) or exc}")
            return
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self._problem("", "", "the manifest must be a mapping of keys (name, model, defaults, jobs, ...)")
            return
        lines = {}
        if isinstance(root, yaml.MappingNode):
            for k, v in root.value:
                lines[k.value] = (k.start_mark.line + 1, v)
        for key in data:
            if key not in TOP_KEYS:
                line = lines.get(key, (0, None))[0]
                self._problem(f"line {line}" if line else "", str(key),
                              f"unknown key; allowed: {', '.join(TOP_KEYS)}")

        def where(key: str) -> str:
            return f"line {lines[key][0]}" if key in lines else ""

        if "name" in data:
            if not isinstance(data["name"], str | int) or isinstance(data["name"], bool):
                self._problem(where("name"), "name", "must be a string")
            else:
                self._name = str(data["name"])
        if "model" in data:
            if not isinstance(data["model"], str) or not data["model"].strip():
                self._problem(where("model"), "model", "must be a model id such as " + DEFAULT_MODEL)
            else:
                self.model_id = data["model"].strip().strip("/")
        if "schema" in data:
            if not isinstance(data["schema"], str):
                self._problem(where("schema"), "schema", "must be a path to a schema file")
            elif self._schema_file is None:
                self._schema_file = self.folder / data["schema"]
                if not self._schema_file.exists():
                    self._problem(where("schema"), "schema", f"file not found: {data['schema']}")
                    self._schema_file = None
        if "image_base_url" in data:
            url = data["image_base_url"]
            parts = urlsplit(url) if isinstance(url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
                self._problem(where("image_base_url"), "image_base_url",
                              "must be an https:// URL where the manifest's local images are published")
            elif parts.scheme == "http" and not is_loopback_host(parts.hostname):
                self._problem(where("image_base_url"), "image_base_url",
                              "must be https:// (plain http only for loopback addresses)")
            else:
                self.image_base_url = url.rstrip("/")
        if "defaults" in data:
            if not isinstance(data["defaults"], dict):
                self._problem(where("defaults"), "defaults", "must be a mapping of field: value")
            else:
                self.defaults = {str(k): v for k, v in data["defaults"].items()}
        if "matrix" in data:
            m = data["matrix"]
            if not isinstance(m, dict) or not m:
                self._problem(where("matrix"), "matrix", "must be a mapping of field: [values, ...]")
            else:
                for k, v in m.items():
                    if not isinstance(v, list) or not v:
                        self._problem(where("matrix"), f"matrix.{k}", "must be a non-empty list of values")
                    else:
                        self.matrix[str(k)] = v
        if "repeat" in data:
            r = data["repeat"]
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                self._problem(where("repeat"), "repeat", f"must be a whole number of at least 1, got {r!r}")
            else:
                self.repeat = r
        if "rows" in data:
            if not isinstance(data["rows"], str):
                self._problem(where("rows"), "rows", "must be the path of a CSV file")
            else:
                self._rows = self.folder / data["rows"]
                if not self._rows.exists():
                    self._problem(where("rows"), "rows", f"CSV file not found: {data['rows']}")
                    self._rows = None
        if "jobs" in data:
            jobs = data["jobs"]
            node = lines.get("jobs", (0, None))[1]
            if not isinstance(jobs, list):
                self._problem(where("jobs"), "jobs", "must be a list of jobs (mappings of field: value)")
            else:
                items = node.value if isinstance(node, yaml.SequenceNode) else []
                for i, job in enumerate(jobs):
                    line = items[i].start_mark.line + 1 if i < len(items) else 0
                    if not isinstance(job, dict):
                        self._problem(f"line {line}", "jobs", f"job {i + 1} must be a mapping of field: value")
                        continue
                    self._jobs.append(_Base({str(k): v for k, v in job.items()}, self.file,
                                            f"line {line}", self.folder))
        if "jobs" not in data and "rows" not in data:
            self._problem("", "jobs", "the manifest has no jobs: add a 'jobs' list or 'rows: file.csv'")

    # ---- expansion -----------------------------------------------------------------------------

    def _csv_bases(self) -> Iterator[_Base]:
        assert self._rows is not None
        path = self._rows
        name = path.name
        folder = path.resolve().parent
        try:
            fh = open(path, newline="", encoding="utf-8-sig")
        except OSError as exc:
            self._problem("", "", f"cannot read: {exc.strerror or exc}", file=name)
            return
        with fh:
            reader = csv.reader(fh)
            try:
                header = next(reader)
            except StopIteration:
                self._problem("", "", "the CSV file is empty (it needs a header row)", file=name)
                return
            except csv.Error as exc:
                self._problem("row 1", "", f"not valid CSV: {exc}", file=name)
                return
            header = [h.strip() for h in header]
            if not any(header):
                self._problem("row 1", "", "the header row is empty", file=name)
                return
            seen_cols: set[str] = set()
            for h in header:
                if h in seen_cols:
                    self._problem("row 1", h, "column appears twice", file=name)
                    return
                seen_cols.add(h)
            rowno = 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    self._problem(f"row {rowno + 1}", "", f"not valid CSV: {exc}", file=name)
                    break
                rowno += 1
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) > len(header):
                    self._problem(f"row {rowno}", "", f"{len(row)} cells but the header has {len(header)} columns",
                                  file=name)
                    continue
                values: dict[str, Any] = {}
                for col, cell in zip(header, row, strict=False):
                    if col and cell.strip() != "":
                        values[col] = self._cast(col, cell.strip(), name, rowno)
                yield _Base(values, name, f"row {rowno}", folder)

    def _cast(self, col: str, cell: str, file: str, rowno: int) -> Any:
        t = self.schema.field_type(col) if self.schema else None
        try:
            if t == "integer":
                return int(cell)
            if t == "number":
                return float(cell)
            if t == "boolean":
                low = cell.lower()
                if low in ("true", "yes", "1"):
                    return True
                if low in ("false", "no", "0"):
                    return False
                raise ValueError
        except ValueError:
            allowed = {"integer": "a whole number", "number": "a number",
                       "boolean": "true or false"}[t]
            self._problem(f"row {rowno}", col, f"'{cell}' is not {allowed}", file=file)
            return _Invalid(cell)
        return cell

    def iter_jobs(self) -> Iterator[JobSpec]:
        """Stream every job. Duplicates (same key) are skipped and counted in ``duplicates``."""
        if any(p.file == self.file and p.location == "" and p.field in ("", "schema") for p in self.problems):
            return
        seen: set[str] = set()
        self.duplicates = 0
        seq = 0
        bases: Iterator[_Base] = iter(self._jobs)
        if self._rows is not None:
            bases = itertools.chain(bases, self._csv_bases())
        combos = [dict(zip(self.matrix, values, strict=True))
                  for values in itertools.product(*self.matrix.values())] or [{}]
        for base in bases:
            for combo in combos:
                for rep in range(self.repeat):
                    spec = self._expand(base, combo, rep, seq)
                    if spec is None:
                        break
                    if spec.key in seen:
                        self.duplicates += 1
                        continue
                    seen.add(spec.key)
                    seq += 1
                    yield spec

    def _expand(self, base: _Base, combo: dict[str, Any], rep: int, seq: int) -> JobSpec | None:
        schema = self.schema
        merged: dict[str, Any] = dict(self.defaults)
        merged.update(base.values)
        merged.update(combo)
        merged = self._apply_aliases(merged, base)
        if schema is not None:
            merged = schema.apply_defaults(merged)
        ok = True
        if any(isinstance(v, _Invalid) for v in merged.values()):
            ok = False
        # Templates: every variable of the job may be used; a missing one is a problem.
        variables = {k: v for k, v in merged.items()}
        used: set[str] = set()
        rendered: dict[str, Any] = {}
        for k, v in merged.items():
            used |= _template_names(v)
            try:
                rendered[k] = _render(v, variables)
            except KeyError as exc:
                self._problem(base.location, k, f"template uses {{{exc.args[0]}}}, which this job does not "
                              f"define; defined: {', '.join(sorted(variables))}", file=base.file)
                ok = False
            except (ValueError, IndexError) as exc:
                self._problem(base.location, k, f"bad template ({exc}); write {{{{ and }}}} for literal braces",
                              file=base.file)
                ok = False
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
                allowed = ", ".join(schema.properties)
                self._problem(base.location, k, f"unknown field; allowed: {allowed} (or an image alias "
                              f"such as 'image', or prefix it with _ to keep it as a note)", file=base.file)
        # Go on to the images even when something is already wrong: every problem at once.
        local_files: dict[str, str] = {}
        key_inputs = dict(inputs)
        image_fields = schema.image_fields() if schema else {k: isinstance(v, list) for k, v in inputs.items()
                                                              if k in IMAGE_ALIASES}
        for fname in image_fields:
            if fname not in inputs:
                continue
            value = inputs[fname]
            refs = value if isinstance(value, list) else [value]
            sent, keyed = [], []
            for ref in refs:
                if not isinstance(ref, str):
                    sent.append(ref)
                    keyed.append(ref)
                    continue
                res = self._resolve_image(ref, base, fname)
                if res is None:
                    # Already reported; keep the job so its other fields are checked too (a
                    # manifest with any problem records nothing, so it is never submitted).
                    self.bad_refs.add(ref)
                    sent.append(ref)
                    keyed.append(ref)
                    continue
                url, path = res
                sent.append(url)
                if path is not None:
                    local_files[url] = str(path)
                    keyed.append("sha256:" + self._file_hash(path))
                else:
                    keyed.append(url)
            inputs[fname] = sent if isinstance(value, list) else (sent[0] if sent else value)
            key_inputs[fname] = keyed if isinstance(value, list) else (keyed[0] if keyed else value)
        if not ok:
            return None
        if self.matrix:
            meta["matrix"] = combo
        if self.repeat > 1:
            meta["repeat"] = rep
        canonical = json.dumps({"model": self.model_id, "inputs": key_inputs, "repeat": rep},
                               sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        key = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        return JobSpec(self.name, self.model_id, key, seq, f"{base.file}, {base.location}", inputs, meta,
                       local_files)

    def _apply_aliases(self, merged: dict[str, Any], base: _Base) -> dict[str, Any]:
        """Map friendly image columns ('image', 'image_url', ...) onto the model's one image
        field, as a list when the model wants a list ('a.jpg|b.jpg' for several)."""
        schema = self.schema
        if schema is None:
            return merged
        fields = schema.image_fields()
        if len(fields) != 1:
            return merged
        target, is_list = next(iter(fields.items()))
        given = [a for a in IMAGE_ALIASES if a != target and a not in schema.properties and a in merged]
        if given:
            # The most specific level wins: a job's own value over the manifest's defaults.
            own = [a for a in given if a in base.values] + ([target] if target in base.values else [])
            if len(own) > 1:
                self._problem(base.location, own[0], f"the image is given twice ({', '.join(own)}); use one",
                              file=base.file)
                return merged
            chosen = own[0] if own else given[0]
            value = merged[chosen]
            for a in given:
                merged.pop(a)
            if chosen != target:
                merged[target] = value
        if is_list and isinstance(merged.get(target), str):
            merged[target] = [v.strip() for v in merged[target].split("|") if v.strip()]
        elif not is_list and isinstance(merged.get(target), list) and len(merged[target]) == 1:
            merged[target] = merged[target][0]
        return merged

    def _resolve_image(self, ref: str, base: _Base, fname: str) -> tuple[str, Path | None] | None:
        """(value to send, local file or None). A problem is recorded when it cannot be used.
        Cached per (folder, reference): a 100,000-job manifest names a handful of images."""
        cache_key = (base.folder, ref)
        if cache_key in self._resolved:
            hit = self._resolved[cache_key]
            if hit is None:  # report it again for this job's own location
                return self._resolve_image_uncached(ref, base, fname)
            return hit
        result = self._resolve_image_uncached(ref, base, fname)
        self._resolved[cache_key] = result
        return result

    def _resolve_image_uncached(self, ref: str, base: _Base, fname: str) -> tuple[str, Path | None] | None:
        parts = urlsplit(ref)
        if parts.scheme in ("http", "https"):
            if parts.scheme == "http" and not is_loopback_host(parts.hostname):
                self._problem(base.location, fname, f"{ref}: plain http is allowed only for loopback "
                              "addresses; use https://", file=base.file)
                return None
            return ref, None
        if parts.scheme and len(parts.scheme) > 1 and parts.scheme != "file":
            self._problem(base.location, fname, f"{ref}: unsupported scheme '{parts.scheme}'; use an https:// "
                          "URL or a local file path", file=base.file)
            return None
        raw = parts.path if parts.scheme == "file" else ref
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = base.folder / path
        path = path.resolve()
        if not path.is_file():
            self._problem(base.location, fname, f"local image not found: {ref} (looked for {path})",
                          file=base.file)
            return None
        if self.image_base_url:
            try:
                rel = path.relative_to(self.folder)
            except ValueError:
                self._problem(base.location, fname, f"{ref} is outside the manifest's folder, so "
                              "image_base_url cannot say where it is published", file=base.file)
                return None
            url = self.image_base_url + "/" + "/".join(quote(p) for p in rel.parts)
            return url, path
        return path.as_uri(), path

    def _file_hash(self, path: Path) -> str:
        digest = self._hash_cache.get(path)
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            digest = self._hash_cache[path] = h.hexdigest()
        return digest


class _Invalid(str):
    """A CSV cell that failed its cast (already reported); it makes the job invalid."""


def _render(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, str) and ("{" in value or "}" in value):
        return value.format_map(_Vars(variables))
    if isinstance(value, list):
        return [_render(v, variables) for v in value]
    return value


class _Vars(dict):  # type: ignore[type-arg]
    """Template variables; a missing one raises KeyError with its name."""

    def __missing__(self, key: str) -> Any:
        raise KeyError(key)


def load_manifest(path: str | Path, batch: str | None = None, schema_path: str | Path | None = None) -> Manifest:
    """Load a manifest. Problems of structure are in ``Manifest.problems`` (raise_problems()
    turns them into a ManifestError)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError([Problem(str(path), "", "", "file not found")])
    return Manifest(path, batch=batch, schema_path=Path(schema_path) if schema_path else None)
