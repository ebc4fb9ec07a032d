"""One pass of expansion: a loaded manifest's layers (defaults, each job or CSV row, matrix
values, repeat copies) merged into jobs, templates rendered, values typed, image references
resolved, and each job keyed. Every problem met goes to the pass's ``ProblemLog``.

The schema's defaults are applied here rather than in validation so that the job key covers them:
``frames: 121`` written out and ``frames`` left to its default are the same job.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import Problem
from ..jobkeys import canonical_json, job_key_of_json
from ..outputnames import safe_stem
from .csvread import CsvRows, header_of
from .imagerefs import IMAGE_ALIASES, is_image_name, listify
from .problems import ProblemLog, did_you_mean
from .spec import JobSpec, Level
from .templates import TemplateError, needs_rendering, render, template_names
from .values import Invalid, coerce

if TYPE_CHECKING:
    from .loader import Manifest

Combo = tuple[dict[str, Any], dict[str, Any]]  # a matrix combination: as written, and normalized
# The key (in defaults, a job, a CSV column) that names a job's output files: never sent, not
# part of the key (outputnames.py).
OUTPUT_NAME = "output_name"
_BAD = object()  # an output_name that is no text: reported, the job not made


class Expansion:
    """Streams a manifest's jobs (``jobs()``); counts the ``duplicates`` it skips."""

    def __init__(self, manifest: Manifest, log: ProblemLog):
        self.manifest = manifest
        self.log = log
        self.duplicates = 0
        self.schema = schema = manifest.schema
        self.image_fields = schema.image_fields() if schema else {}
        self.other_media = schema.other_media_fields() if schema else {}
        # Fields typed by values.coerce: a YAML "121" or 121.0 is the integer 121, as a CSV cell is.
        self.numeric = {name: t for name in schema.properties
                        if (t := schema.field_type(name)) in ("integer", "number")} if schema else {}
        self.model_json = canonical_json(manifest.model_id)  # part of every job's key
        self.rows = CsvRows(manifest.rows, manifest.rows_name, schema, log) if manifest.rows is not None else None
        self._names: set[str] | None = None

    def jobs(self) -> Iterator[JobSpec]:
        manifest = self.manifest
        seen: set[str] = set()
        seq = 0
        defaults = self._normalize(manifest.defaults, manifest.top_level("defaults"))
        combos = self._combos()
        per_level = len(combos) * manifest.repeat
        made = 0
        for level in self._levels():
            # A backstop: the manifest counted the jobs before, unless the CSV file grew since.
            made += per_level
            if made > manifest.max_expand:
                self.log.add(Problem(level.file, level.location, "",
                                     manifest.too_many(f"more than {manifest.max_expand:,}")))
                return
            own = self._normalize(level.values, level)
            for raw_combo, combo in combos:
                for rep in range(manifest.repeat):
                    spec = self._expand(level, defaults, own, raw_combo, combo, rep, seq)
                    if spec is None:
                        break  # its problem is recorded; the other copies would repeat it
                    if spec.key in seen:
                        self.duplicates += 1
                        continue
                    seen.add(spec.key)
                    seq += 1
                    yield spec

    def _combos(self) -> list[Combo]:
        matrix = self.manifest.matrix
        if not matrix:
            return [({}, {})]
        level = self.manifest.top_level("matrix")
        # A matrix without an image field has nothing to normalize (most matrices: seeds, sizes).
        normalize = self._image_keys(matrix)
        return [(combo, self._normalize(combo, level) if normalize else combo)
                for combo in (dict(zip(matrix, values, strict=True)) for values in itertools.product(*matrix.values()))]

    def _levels(self) -> Iterator[Level]:
        yield from self.manifest.listed
        if self.rows is not None:
            folder = self.rows.path.resolve().parent  # a row's relative paths are relative to its CSV
            for rowno, values in self.rows:
                yield Level(values, self.rows.name, f"row {rowno}", folder, csv=True)

    # ---- one job -------------------------------------------------------------------------------

    def _expand(self, level: Level, defaults: dict[str, Any], own: dict[str, Any], raw_combo: dict[str, Any],
                combo: dict[str, Any], rep: int, seq: int) -> JobSpec | None:
        merged = {**defaults, **own, **combo}
        if self.schema is not None:
            merged = self.schema.apply_defaults(merged)
        rendered, used, broken = self._render(merged, level, own, combo)
        for name, t in self.numeric.items():
            value = rendered.get(name)
            if type(value) is str or type(value) is float:
                rendered[name] = coerce(t, value)
        output_name = self._output_name(rendered.pop(OUTPUT_NAME, None), level, own, combo)
        # With a template broken, a key no template used may be the variable it meant: not
        # reported as unknown until the template is fixed.
        inputs, meta = self._split(rendered, used, level, own, combo, report=not broken)
        local_files, key_inputs = self._resolve_images(inputs, level, own, combo)
        if broken or output_name is _BAD or any(isinstance(v, Invalid) for v in merged.values()):
            # A template that cannot be filled, a cell that did not cast, a value that cannot be
            # sent: reported, with the job's other problems found above; but a job with a value
            # nobody meant is not worth checking further.
            return None
        if self.manifest.matrix:
            meta["matrix"] = dict(raw_combo)
        if self.manifest.repeat > 1:
            meta["repeat"] = rep
        # The inputs' canonical JSON is what gets recorded, and (without local files) what the
        # key hashes: one encoding per job instead of three.
        inputs_json = canonical_json(inputs)
        key_json = inputs_json if key_inputs is inputs else canonical_json(key_inputs)
        key = job_key_of_json(self.model_json, key_json, rep)
        return JobSpec(self.manifest.name, self.manifest.model_id, key, seq, f"{level.file}, {level.location}",
                       inputs, meta, local_files, inputs_json,
                       output_name if isinstance(output_name, str) else None)

    def _output_name(self, value: Any, level: Level, own: dict[str, Any],
                     combo: dict[str, Any]) -> str | None | object:
        """The job's ``output_name`` (its template already filled) made a safe file name stem;
        None: not given, or nothing usable left (its key names it); _BAD: not text (reported)."""
        if value is None or isinstance(value, Invalid):
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            origin = level if OUTPUT_NAME in own else self.manifest.top_level(
                "matrix" if OUTPUT_NAME in combo else "defaults")
            self._at(origin, OUTPUT_NAME, "must be a text such as \"{subject}_{seed}\" (the name of the "
                     "job's output files, without extension)", once=origin.csv or OUTPUT_NAME not in own)
            return _BAD
        return safe_stem(str(value))

    def _render(self, merged: dict[str, Any], level: Level, own: dict[str, Any],
                combo: dict[str, Any]) -> tuple[dict[str, Any], set[str], bool]:
        """(values with templates filled, the variables templates used, whether one failed).
        Every variable of the job may be used; a missing one is a problem."""
        rendered: dict[str, Any] = {}
        used: set[str] = set()
        broken = False
        for k, v in merged.items():
            if not needs_rendering(v):
                rendered[k] = list(v) if type(v) is list else v  # no two jobs share a list
                continue
            used |= template_names(v)
            try:
                rendered[k] = render(v, merged)
            except TemplateError as exc:
                self._template_problem(exc, k, merged, level, own, combo)
                broken = True
        return rendered, used, broken

    def _template_problem(self, exc: TemplateError, key: str, merged: dict[str, Any], level: Level,
                          own: dict[str, Any], combo: dict[str, Any]) -> None:
        missing = exc.missing
        if missing is not None and missing not in self._known_names():
            # No job could fill it: a typo in the template, reported where the template is
            # written (once), not on every row that uses it.
            names = sorted(self._known_names())
            message = (f"template uses {{{missing}}}, which no job defines{did_you_mean(missing, names)}; "
                       f"defined: {', '.join(names)}")
            origin = level if key in own else self.manifest.top_level("matrix" if key in combo else "defaults")
            self._at(origin, key, message, once=origin.csv)
            return
        message = str(exc)
        if missing is not None:
            message += f"; defined: {', '.join(sorted(merged))}"
        # A template from the defaults that no row can fill is reported once, not per row.
        self._at(level, key, message, once=level.csv and key not in own)

    def _known_names(self) -> set[str]:
        """Every variable some job of the manifest defines: keys of the defaults, the matrix, the
        jobs listed, the CSV header, and the fields the schema gives a default."""
        if self._names is None:
            manifest = self.manifest
            names = {*manifest.defaults, *manifest.matrix, *(k for level in manifest.listed for k in level.values)}
            if self.rows is not None:  # a job listed before the rows meets a problem before they are read
                names |= {h for h in self.rows.header or header_of(self.rows.path) if h}
            if self.schema is not None:
                names |= set(self.schema.apply_defaults({}))
            aliases = self._image_keys(dict.fromkeys(names))
            if aliases:  # given under an alias, the image's variable is its field's name
                names = (names - set(aliases)) | set(self.image_fields)
            self._names = names
        return self._names

    def _split(self, rendered: dict[str, Any], used: set[str], level: Level, own: dict[str, Any],
               combo: dict[str, Any], *, report: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """(inputs sent, meta kept): notes (``_name``) and template-only variables are kept for
        reports, not sent; any other key the model does not know is a problem."""
        schema = self.schema
        inputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for k, v in rendered.items():
            if k.startswith("_"):
                meta[k] = v
            elif schema is None or k in schema.properties:
                inputs[k] = v
            elif k in used:
                meta[k] = v
            elif report:
                self._unknown(k, level, own, combo)
        return inputs, meta

    def _unknown(self, k: str, level: Level, own: dict[str, Any], combo: dict[str, Any]) -> None:
        """Report a key that is no field of the model, where it was written, once."""
        assert self.schema is not None
        fields = list(self.schema.properties)
        hint = did_you_mean(k, fields + list(IMAGE_ALIASES))
        aliases = ""
        if len(self.image_fields) == 1:
            aliases = f"or image / image_url for {next(iter(self.image_fields))}; "
        allowed = f"allowed: {', '.join(fields)} ({aliases}or prefix it with _ to keep it as a note)"
        if k in own:
            what = "column" if level.csv else "field"
            self._at(level, k, f"unknown {what} '{k}'{hint}; {allowed}", once=level.csv)
        else:
            origin = self.manifest.top_level("matrix" if k in combo else "defaults")
            self._at(origin, k, f"unknown field '{k}'{hint}; {allowed}")

    def _resolve_images(self, inputs: dict[str, Any], level: Level, own: dict[str, Any],
                        combo: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
        """Image references in ``inputs`` (in place) made what is sent; returns the local files
        behind them and the inputs as the key sees them (a local file by its content)."""
        if self.schema is not None:
            fields = [*self.image_fields, *self.other_media]
        else:
            fields = [k for k in inputs if is_image_name(k)]
        # Relative paths are relative to the file that wrote them: a row's to its CSV.
        folder_of = {f: level.folder for f in fields if f in own and f not in combo}
        local_files, key_inputs, problems = self.manifest.images.resolve_inputs(
            inputs, fields, folder_of, self.manifest.folder)
        for field_name, message in problems:
            self._at(level, field_name, message)
        return local_files, key_inputs

    # ---- image aliases -------------------------------------------------------------------------

    def _image_keys(self, values: dict[str, Any]) -> list[str]:
        """The keys of ``values`` that give the model's one image field (itself or an alias)."""
        if self.schema is None or len(self.image_fields) != 1:
            return []
        target = next(iter(self.image_fields))
        properties = self.schema.properties
        return [k for k in values if k == target or (k in IMAGE_ALIASES and k not in properties)]

    def _normalize(self, values: dict[str, Any], level: Level) -> dict[str, Any]:
        """``values`` with an image alias ('image', 'image_url', ...) moved onto the model's one
        image field, as a list when it wants one ('a.jpg|b.jpg' for several)."""
        given = self._image_keys(values)
        if not given:
            return values
        target, is_list = next(iter(self.image_fields.items()))
        if len(given) > 1:
            self._at(level, given[0], f"the image is given twice ({', '.join(given)}); use one", once=level.csv)
        out = {k: v for k, v in values.items() if k not in given}
        out[target] = listify(values[given[0]], is_list)
        return out

    def _at(self, level: Level, field_name: str, message: str, *, once: bool = False) -> None:
        """A problem with ``field_name`` of ``level``; ``once``: per file and field, not per row."""
        problem = Problem(level.file, level.where(field_name), field_name, message)
        self.log.add(problem, once_per=(level.file, field_name, message) if once else None)
