"""Model schemas as data: RunComfy's JSON Schema for a model's input, plus its `validations` rules.

Adding a model is adding a file to ``batchgen/models/`` (or passing ``--schema FILE``): nothing
here names a model. ``check`` is pure: image facts come in already probed (see images.py).

RunComfy's rules look like ``{"validation_rule": "width_pixels>", "validation_value": 320,
"validation_error": "The shortest side must be at least 320 pixels."}``: a subject
(``file_size_mb``, ``width_pixels``, ``height_pixels``, ``width/height``, ``file_type``) and an
operator (``<``, ``<=``, ``>``, ``>=``, ``==``, ``_in``). They are applied literally, whatever the
message says: ``width_pixels> 320`` refuses a side of exactly 320.
"""

from __future__ import annotations

import json
import logging
import numbers
import operator
import re
from collections.abc import Callable, Sized
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .errors import BatchgenError
from .images import ImageInfo
from .inline import shown

if TYPE_CHECKING:
    import jsonschema

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).parent / "models"

# A "MB" in a file_size_mb rule is 10^6 bytes. RunComfy does not say whether it means 10^6 or
# 2^20; 10^6 is the stricter reading (4.7 MB = 4,700,000 bytes, less than 4.7 MiB), so no file we
# accept can be refused by a service that means the other.
BYTES_PER_MB = 1_000_000

IMAGE_FORMATS = ("image_uri", "image_uris")
# Fields that take other files: checked by their type and size (their content is not parsed).
# Keyed by object: looked up with whatever an (untrusted) schema has as a field's format.
OTHER_MEDIA: dict[object, str] = {
    "video_uri": "video", "video_uris": "video", "audio_uri": "audio", "audio_uris": "audio"}
# The rules that need only a file's type and size, so apply to any media file.
FILE_SUBJECTS = ("file_size_mb", "file_type")

SUBJECTS = ("file_size_mb", "width_pixels", "height_pixels", "width/height", "file_type")
OPERATORS = ("<=", ">=", "==", "<", ">", "_in")  # two-character ones first, for the parser
_RULE = re.compile(r"^\s*(?P<subject>[a-z_/]+?)\s*(?P<op><=|>=|==|<|>|_in)\s*$")
_OP_WORDS = {"<": "less than", "<=": "at most", ">": "greater than", ">=": "at least", "==": "exactly",
             "_in": "one of"}
_TYPE_WORDS = {"string": "text", "integer": "a whole number", "number": "a number", "boolean": "true or false",
               "array": "a list", "object": "a mapping", "null": "null"}


class SchemaError(BatchgenError):
    """A model schema file cannot be read or is not a RunComfy schema."""


@dataclass(frozen=True)
class Rule:
    """One of RunComfy's ``validations``, parsed."""

    subject: str  # one of SUBJECTS
    op: str  # one of OPERATORS
    value: Any
    message: str  # the schema's validation_error, shown to the user

    def allowed(self) -> str:
        """What the rule allows, in plain words with exact numbers."""
        word = _OP_WORDS[self.op]
        if self.subject == "file_type":
            kinds = self.value if isinstance(self.value, list) else [self.value]
            return f"{word} {', '.join(str(k).upper() for k in kinds)}"
        if self.subject == "file_size_mb":
            return f"{word} {_fmt_bytes(self.value)}; 1 MB = {BYTES_PER_MB:,} bytes"
        what = {"width_pixels": "width", "height_pixels": "height", "width/height": "width/height"}[self.subject]
        unit = " pixels" if self.subject != "width/height" else ""
        values = ", ".join(str(v) for v in self.value) if self.op == "_in" else str(self.value)
        return f"{what} {word} {values}{unit}"

    def passes(self, info: ImageInfo) -> bool:
        if self.subject == "file_type":
            kinds = self.value if self.op == "_in" else [self.value]
            return _norm_type(info.format) in {_norm_type(str(k)) for k in kinds}
        actual = self.measure(info)
        if actual is None:
            return False
        if self.op == "_in":
            return actual in {_exact(v) for v in self.value}
        limit = _exact(self.value)
        return {"<": actual < limit, "<=": actual <= limit, ">": actual > limit, ">=": actual >= limit,
                "==": actual == limit}[self.op]

    def measure(self, info: ImageInfo) -> Fraction | None:
        # Exact arithmetic: 330/1000 must equal 0.33 and 963/321 must equal 3, with no float
        # rounding deciding a boundary either way.
        if self.subject == "file_size_mb":
            return Fraction(info.size, BYTES_PER_MB)
        if self.subject == "width_pixels":
            return Fraction(info.width)
        if self.subject == "height_pixels":
            return Fraction(info.height)
        return Fraction(info.width, info.height) if info.height else None

    def explain(self, info: ImageInfo) -> str:
        """Why ``info`` fails this rule: what the image is, the schema's message, what is allowed."""
        return explain_failures([self], info)[0]

    def actual(self, info: ImageInfo) -> str:
        """What ``info`` is, in the terms of this rule: "image is 300x300"."""
        what = "image" if info.width else "file"  # a video or audio file: no dimensions read
        if self.subject == "file_type":
            return f"{what} is {info.format.upper()}"
        if self.subject == "file_size_mb":
            return f"{what} is {info.size:,} bytes"
        if self.subject == "width/height":
            ratio = f"{float(info.width / info.height):.4g}" if info.height else "undefined"
            return f"image is {info.width}x{info.height} (width/height {ratio})"
        return f"image is {info.width}x{info.height}"


def explain_failures(rules: list[Rule], info: ImageInfo) -> list[str]:
    """One message per thing wrong with ``info``, for the ``rules`` it fails. Rules that say the
    same of the same facts are one message: a 300x300 image fails "width > 320" and "height >
    320", both "The shortest side must be at least 320 pixels", which is one problem to fix."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for rule in rules:
        grouped.setdefault((rule.actual(info), rule.message.strip().rstrip(".")), []).append(rule.allowed())
    out = []
    for (actual, said), allowed in grouped.items():
        allows = " and ".join(allowed)
        out.append(f"{actual}; {said} (allowed: {allows})" if said else f"{actual}; allowed: {allows}")
    return out


def _exact(value: Any) -> Fraction:
    # str() first: Fraction(0.33) is the binary float 0.330000000000000015..., Fraction("0.33")
    # is the 33/100 the schema's author wrote.
    return Fraction(str(value)) if isinstance(value, float) else Fraction(value)


def _fmt_bytes(mb: Any) -> str:
    n = _exact(mb) * BYTES_PER_MB
    return f"{int(n):,} bytes" if n.denominator == 1 else f"{float(n):,.1f} bytes"


def _norm_type(name: str) -> str:
    name = name.strip().lower().removeprefix("image/").lstrip(".")
    return "jpeg" if name in ("jpg", "jpe", "pjpeg") else name


def parse_rule(raw: Any) -> Rule:
    """One ``validations`` entry as a Rule; ValueError says what is not understood."""
    if not isinstance(raw, dict) or "validation_rule" not in raw:
        raise ValueError(f"validation entry {json.dumps(raw, default=str)[:80]} has no validation_rule")
    text = str(raw.get("validation_rule"))
    value = raw.get("validation_value")
    message = str(raw.get("validation_error") or "")
    m = _RULE.match(text)
    if not m or m.group("subject") not in SUBJECTS:
        raise ValueError(f"rule '{text}' is not understood by batchgen (known subjects: {', '.join(SUBJECTS)}; "
                         f"operators: {', '.join(OPERATORS)})")
    subject, op = m.group("subject"), m.group("op")

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if subject == "file_type":
        ok = (op == "_in" and isinstance(value, list) and value and all(isinstance(v, str) for v in value)) or (
            op == "==" and isinstance(value, str))
    elif op == "_in":
        ok = isinstance(value, list) and bool(value) and all(number(v) for v in value)
    else:
        ok = number(value)
    if not ok:
        raise ValueError(f"rule '{text}' has a value batchgen cannot use: {json.dumps(value, default=str)}")
    return Rule(subject, op, value, message)


def model_filename(model_id: str) -> str:
    """The bundled file of a model: ``bytedance/dreamina-3-0/pro/image-to-video`` ->
    ``bytedance--dreamina-3-0--pro--image-to-video.json``."""
    return model_id.strip("/").replace("/", "--") + ".json"


class ModelSchema:
    """One model's input schema and the checks it implies."""

    def __init__(self, data: dict[str, Any], source: str = ""):
        if not isinstance(data, dict) or not isinstance(data.get("input"), dict):
            raise SchemaError(f"{source or 'schema'}: no 'input' object; not a RunComfy model schema")
        self.data = data
        self.source = source
        self.model_id: str = str(data.get("model_id") or "")
        # RunComfy's catalog writes "float" where JSON Schema says "number": read as the standard
        # name everywhere (checks, CSV casting, descriptions), so jsonschema accepts the schema.
        self.input_schema: dict[str, Any] = _standard_types(data["input"])
        props = self.input_schema.get("properties") or {}
        if not isinstance(props, dict) or not all(isinstance(p, dict) for p in props.values()):
            raise SchemaError(f"{source or 'schema'}: input 'properties' must map field names to schemas")
        self.properties: dict[str, Any] = props
        self.required: list[str] = [str(r) for r in self.input_schema.get("required") or []]
        # Optional fields' defaults, in field order (apply_defaults runs once per job).
        self._defaults = [(name, prop["default"]) for name, prop in props.items()
                          if name not in self.required and "default" in prop]
        extra = data.get("x-batchgen")
        if not isinstance(extra, dict):
            extra = {}
        price = extra.get("base_price_usd")
        self.base_price_usd: float | None = (
            float(price) if isinstance(price, int | float) and not isinstance(price, bool) else None)
        # "output": the price is per job; "second": per second of the job's `duration` (job_price).
        unit = extra.get("price_unit")
        self.price_unit: str = unit if isinstance(unit, str) and unit else "output"
        # Where the schema came from, for `batchgen models ID`: "bundled", "catalog", a file.
        origin = extra.get("origin")
        if not isinstance(origin, str) or not origin:
            bundled = bool(source) and Path(source).resolve().parent == MODELS_DIR.resolve()
            origin = "bundled" if bundled else "file"
        self.origin: str = origin
        kind = extra.get("output_kind")
        self.output_kind: str = kind if kind in ("video", "image") else _guess_output_kind(self.model_id, data)

        # The JSON Schema part. RunComfy's custom keyword is removed (jsonschema would ignore it,
        # but its errors would quote it); unknown formats such as image_uri are not checked
        # because no format checker is given. Fields outside `properties` are refused unless the
        # schema itself says otherwise: a misspelt optional field would otherwise be dropped
        # silently by the service and the job paid for with the default.
        plain = _strip_validations(self.input_schema)
        plain.setdefault("additionalProperties", False)
        plain.pop("required", None)  # checked by hand, with a message that says what is allowed
        self._plain = plain
        self._validator: jsonschema.Draft202012Validator | None = None  # built when first needed
        # Checking field by field lets the answer for a value many jobs share (frames: 121, the
        # same image) be remembered; a whole-object check would redo it all for each of 100,000
        # jobs. Only for the plain shape RunComfy publishes; anything fancier is checked whole.
        # A "$ref" points into the whole input schema, so a schema with one is checked whole.
        plain_shape = (set(plain) <= _PLAIN_KEYWORDS and plain.get("additionalProperties") is False
                       and not _mentions(plain, "$ref"))
        field_schemas = plain.get("properties") or {}
        self._field_schemas: dict[str, Any] | None = field_schemas if plain_shape else None
        self._field_validators: dict[str, jsonschema.Draft202012Validator] = {}
        # A value passing its field's quick test needs no JSON Schema validation at all: most of a
        # large matrix (a seed per job) would otherwise miss the memo below every time.
        self._quick: dict[str, Callable[[Any], bool]] = {}
        if plain_shape:
            for name, sub in field_schemas.items():
                test = quick_test(sub)
                if test is not None:
                    self._quick[name] = test
        # A schema whose every field has a quick test is sound as it is: quick_test accepts only
        # well-formed values of the keywords that constrain (a length that is a whole number, an
        # enum that is a list, ...). Any other schema is checked against the metaschema now, so a
        # broken one is reported here, not met mid-validation. Checking needs jsonschema, a
        # twentieth of a second to import, which a run of the bundled models then never pays.
        if not (plain_shape and len(self._quick) == len(field_schemas)):
            jsonschema = _jsonschema()
            try:
                jsonschema.Draft202012Validator.check_schema(plain)
            except jsonschema.SchemaError as exc:
                raise SchemaError(f"{source or 'schema'}: not valid JSON Schema: {exc.message}") from exc
        self._field_cache: dict[tuple[str, Any], list[tuple[tuple[int, str], tuple[str, str]]]] = {}
        self._rule_cache: dict[tuple[str, ImageInfo], list[str]] = {}
        self._order = {name: i for i, name in enumerate(self.properties)}
        self._image_fields = self._find_image_fields()
        self._other_media = self._find_other_media()

        # `validations` may sit on the field or on its items (a list of URLs): both apply to each image.
        self.rules: dict[str, list[Rule]] = {}
        # Rules batchgen cannot apply, as (field, message): reported, never silently passed.
        self.rule_problems: list[tuple[str, str]] = []
        for name, prop in self.properties.items():
            items = prop.get("items") if isinstance(prop.get("items"), dict) else {}
            raw = [*_as_list(prop.get("validations")), *_as_list(items.get("validations"))]
            for entry in raw:
                try:
                    rule = parse_rule(entry)
                    self.rules.setdefault(name, []).append(rule)
                except ValueError as exc:
                    self.rule_problems.append((name, f"schema {self._label()}: {exc}; update batchgen or "
                                                     "remove the rule from the schema"))
            if name in self.rules and name not in self._image_fields:
                # Only images are probed; of a rule on another kind of file (video, audio), only
                # its type and size are checked here, and the service applies the rest anyway.
                log.info("%s: rules on field %s other than type and size are not checked (not an image field)",
                         self._label(), name)

    @classmethod
    def load(cls, path: str | Path) -> ModelSchema:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SchemaError(f"cannot read schema {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise SchemaError(f"schema {path} is not valid JSON: {exc}") from exc
        return cls(data, str(path))

    def _label(self) -> str:
        return self.model_id or Path(self.source).name or "schema"

    def __repr__(self) -> str:
        return f"ModelSchema({self._label()!r})"

    # ---- what the model takes ------------------------------------------------------------------

    def _find_image_fields(self) -> dict[str, bool]:
        found: dict[str, bool] = {}
        for name, prop in self.properties.items():
            fmt = prop.get("format")
            items = prop.get("items") if isinstance(prop.get("items"), dict) else {}
            if fmt == "image_uris" or (prop.get("type") == "array" and items.get("format") in IMAGE_FORMATS):
                found[name] = True
            elif fmt == "image_uri":
                found[name] = False
        return found

    def _find_other_media(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for name, prop in self.properties.items():
            items = prop.get("items") if isinstance(prop.get("items"), dict) else {}
            kind = OTHER_MEDIA.get(prop.get("format")) or OTHER_MEDIA.get(items.get("format"))
            if kind is not None and name not in self._image_fields:
                found[name] = kind
        return found

    def other_media_fields(self) -> dict[str, str]:
        """Fields that hold video or audio files: name -> "video" or "audio"."""
        return dict(self._other_media)

    def file_rule_failures(self, name: str, info: ImageInfo) -> list[str]:
        """Messages of the type and size rules of field ``name`` that a file fails (``info``'s
        format: the file's MIME subtype, its dimensions unknown)."""
        return explain_failures([rule for rule in self.rules.get(name, ())
                                 if rule.subject in FILE_SUBJECTS and not rule.passes(info)], info)

    def image_fields(self) -> dict[str, bool]:
        """Fields that hold image URLs: name -> True when the field is a list of them."""
        return dict(self._image_fields)

    def field_type(self, name: str) -> str | None:
        """The JSON Schema type of a field ("integer", "array", ...), None if unknown or mixed."""
        t = (self.properties.get(name) or {}).get("type")
        return t if isinstance(t, str) else None

    def item_type(self, name: str) -> str | None:
        items = (self.properties.get(name) or {}).get("items")
        t = items.get("type") if isinstance(items, dict) else None
        return t if isinstance(t, str) else None

    def describe(self, name: str) -> str:
        """What a field takes, in a few words: 'text, at most 800 characters'."""
        prop = self.properties.get(name) or {}
        if "enum" in prop:
            return "one of " + ", ".join(json.dumps(v) for v in prop["enum"])
        t = self.field_type(name)
        if name in self._image_fields:
            if self._image_fields[name]:
                lo, hi = prop.get("minItems"), prop.get("maxItems")
                n = f"exactly {lo}" if lo is not None and lo == hi else f"{lo or 0} to {hi}" if hi else "some"
                words = f"a list of {n} image URL(s)"
            else:
                words = "an image URL"
        else:
            words = _TYPE_WORDS.get(t or "", t or "a value")
        if "maxLength" in prop:
            words += f", at most {prop['maxLength']} characters"
        desc = str(prop.get("description") or "").strip()
        return f"{words} ({desc.rstrip('.')})" if desc else words

    def job_price(self, inputs: dict[str, Any]) -> float | None:
        """What one job with these inputs is likely to cost, None when unknown."""
        return job_price(self.base_price_usd, self.price_unit, inputs)

    def apply_defaults(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults of optional fields only. Required fields' defaults are RunComfy's
        playground examples (a sample prompt and image), never something to send."""
        out = dict(inputs)
        for name, value in self._defaults:
            if name not in out:
                out[name] = value
        return out

    # ---- checking ------------------------------------------------------------------------------

    def check(self, inputs: dict[str, Any], images: dict[str, ImageInfo | str]) -> list[tuple[str, str]]:
        """Every problem with one job's inputs as (field, message).

        ``images`` maps each image reference found in the inputs to its probed facts, or to the
        probe's error message; a reference missing from it is not checked (not probed yet).
        Rules the schema has but batchgen cannot apply are reported on their field too.
        """
        found = [((self._order.get(name, len(self._order)), name), (name, f"is required: {self.describe(name)}"))
                 for name in self.required if name not in inputs]
        if self._field_schemas is None:
            if self._validator is None:
                self._validator = _validator(self._plain)
            errors = _errors_of(self._validator, inputs)
            if isinstance(errors, str):
                found.append(((len(self._order), ""), ("", errors)))
            else:
                found += [(self._error_order(err), self._explain(err)) for err in errors]
        else:
            quick = self._quick
            for name, value in inputs.items():
                test = quick.get(name)
                if test is not None and test(value):
                    continue
                if name in self._field_schemas:
                    found += self._field_errors(name, value)
                else:
                    found.append(((len(self._order), name),
                                  (name, f"unknown field; allowed: {', '.join(self.properties)}")))
        for name, is_list in self._image_fields.items():
            value = inputs.get(name)
            refs = value if is_list and isinstance(value, list) else [value] if isinstance(value, str) else []
            for i, ref in enumerate(refs):
                info = images.get(ref) if isinstance(ref, str) else None
                if info is None:
                    continue
                failures = [f"{shown(ref)}: {info}"] if isinstance(info, str) else self._rule_failures(name, info)
                if failures:
                    label = f"{name}[{i}]" if is_list else name
                    found += [((self._order[name], label), (label, message)) for message in failures]
        if self.rule_problems:
            found += [((self._order[name], name), (name, message)) for name, message in self.rule_problems
                      if name in inputs]
        if not found:
            return []
        # In the schema's field order, so a job's problems read like its form.
        return [p for _, p in sorted(found, key=lambda item: item[0])]

    def _rule_failures(self, name: str, info: ImageInfo) -> list[str]:
        """Messages of the rules of field ``name`` that ``info`` fails; remembered per image."""
        found = self._rule_cache.get((name, info))
        if found is None:
            found = explain_failures([rule for rule in self.rules.get(name, ()) if not rule.passes(info)], info)
            if len(self._rule_cache) >= _CACHE_LIMIT:
                self._rule_cache.clear()
            self._rule_cache[(name, info)] = found
        return found

    def _field_errors(self, name: str, value: Any) -> list[tuple[tuple[int, str], tuple[str, str]]]:
        """(sort key, problem) for one field's value; remembered for small values many jobs share."""
        key = _cache_key(value)
        found = self._field_cache.get((name, key)) if key is not None else None
        if found is None:
            validator = self._field_validators.get(name)
            if validator is None:
                assert self._field_schemas is not None
                validator = _validator(self._field_schemas[name])
                self._field_validators[name] = validator
            errors = _errors_of(validator, value)
            found = [((self._order.get(name, len(self._order)), name), (name, errors))] if isinstance(
                errors, str) else [(self._error_order(err, [name]), self._explain(err, [name])) for err in errors]
            if key is not None:
                if len(self._field_cache) >= _CACHE_LIMIT:
                    self._field_cache.clear()
                self._field_cache[(name, key)] = found
        return found

    def _error_order(self, err: jsonschema.ValidationError, prefix: list[Any] | None = None) -> tuple[int, str]:
        path = [*(prefix or []), *err.absolute_path]
        head = str(path[0]) if path else ""
        return self._order.get(head, len(self._order)), _path_label(path)

    def _explain(self, err: jsonschema.ValidationError, prefix: list[Any] | None = None) -> tuple[str, str]:
        field = _path_label([*(prefix or []), *err.absolute_path])
        # Unset only on an error made by hand: every error iter_errors yields has both.
        v, want, got = err.validator, cast(Any, err.validator_value), cast(Any, err.instance)
        if v == "additionalProperties" and isinstance(got, dict) and not err.absolute_path:
            extra = sorted(k for k in got if k not in self.properties)
            return (", ".join(extra) or field), f"unknown field; allowed: {', '.join(self.properties)}"
        if v == "type":
            words = _TYPE_WORDS.get(want, want) if isinstance(want, str) else " or ".join(map(str, want))
            return field, f"must be of type {want} ({words}), got {json.dumps(got, default=str)}"
        if v == "enum":
            return field, f"must be one of {', '.join(json.dumps(x) for x in want)}, got {json.dumps(got, default=str)}"
        if v == "maxLength":
            return field, f"is {len(got)} characters; at most {want} allowed"
        if v == "minLength":
            return field, f"is {len(got)} characters; at least {want} required"
        if v == "minItems":
            return field, f"has {len(got)} item(s); at least {want} required"
        if v == "maxItems":
            return field, f"has {len(got)} item(s); at most {want} allowed"
        bounds = {"minimum": "at least", "maximum": "at most", "exclusiveMinimum": "greater than",
                  "exclusiveMaximum": "less than"}
        if v in bounds:
            return field, f"is {got}; must be {bounds[v]} {want}"
        if v == "pattern":
            return field, f"{json.dumps(got, default=str)} does not match the pattern {want}"
        if v == "required":
            missing = [r for r in want if isinstance(got, dict) and r not in got]
            return field, f"needs {', '.join(missing)}"
        return field, err.message


def job_price(price: float | None, unit: str | None, inputs: dict[str, Any]) -> float | None:
    """A job's likely cost from its model's price: per job (price_unit "output", or none given),
    or per second (price_unit "second") times the job's ``duration`` field, in seconds, as the
    catalog's per-second models take it (a number, or a numeric string such as "5"). None when
    the price is unknown, the unit is one batchgen does not know, or a per-second job has no
    usable duration: an estimate must not be made up."""
    if price is None:
        return None
    if unit in (None, "", "output", "request", "per request"):
        return price
    if unit != "second":
        return None
    duration = inputs.get("duration")
    if isinstance(duration, str):
        try:
            duration = float(duration.strip().removesuffix("s"))
        except ValueError:
            return None
    if isinstance(duration, bool) or not isinstance(duration, int | float) or not 0 <= duration < float("inf"):
        return None
    return price * duration


# Non-standard type names seen in RunComfy's catalog, and the JSON Schema type each means.
_TYPE_ALIASES = {"float": "number", "int": "integer", "double": "number"}
# Keywords whose value is a schema, a list of schemas, or a mapping of names to schemas.
_SUBSCHEMA = ("items", "additionalProperties", "not", "contains", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def _standard_types(node: Any) -> Any:
    """``node`` with every aliased ``type`` name replaced by its JSON Schema name. Walks schema
    keywords only, so a default or an enum value that happens to say "float" is left alone."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    t = out.get("type")
    if isinstance(t, str):
        out["type"] = _TYPE_ALIASES.get(t, t)
    elif isinstance(t, list):
        out["type"] = [_TYPE_ALIASES.get(x, x) if isinstance(x, str) else x for x in t]
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = _standard_types(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_standard_types(v) for v in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _standard_types(v) for k, v in out[key].items()}
    return out


def _validator(schema: Any) -> Any:
    """A validator that never fetches anything: left to itself, jsonschema downloads a ``$ref``
    to another document (with urllib, blocking the event loop), and a schema from the catalog
    could name any address. Such a reference is unresolvable here (see _errors_of)."""
    from referencing import Registry
    from referencing.exceptions import NoSuchResource

    # referencing's attrs classes declare their fields through a decorator mypy does not read
    # (a home-made __dataclass_transform__), so mypy sees no constructor arguments at all.
    def refuse(uri: str) -> Any:
        raise NoSuchResource(ref=uri)  # type: ignore[call-arg]

    return _jsonschema().Draft202012Validator(
        schema, registry=Registry(retrieve=refuse))  # type: ignore[call-arg]


def _errors_of(validator: Any, value: Any) -> list[Any] | str:
    """jsonschema's errors for ``value``, or why the schema cannot be applied at all (a ``$ref`` to
    nothing or to another document, a reference loop): schemas from RunComfy's catalog are not
    trusted, and such a one is a problem to report, never a crash in the middle of validation."""
    from referencing.exceptions import Unresolvable  # installed with jsonschema; loaded with it

    try:
        return _one_per_value(list(validator.iter_errors(value)))
    except RecursionError:
        return "the model's schema cannot be applied: it refers to itself without end"
    except Unresolvable as exc:
        ref = getattr(exc, "ref", None)
        return f"the model's schema cannot be applied: it refers to {ref or 'something'!r}, which it does not hold"


def _one_per_value(errors: list[Any]) -> list[Any]:
    """``errors`` without a type error where the same value also fails an ``enum`` or ``const``:
    "must be one of 121, 241" already says what is allowed, and a second line about the same
    value reads as a second problem."""
    listed = {tuple(err.absolute_path) for err in errors if err.validator in ("enum", "const")}
    if not listed:
        return errors
    return [err for err in errors if not (err.validator == "type" and tuple(err.absolute_path) in listed)]


def _mentions(node: Any, key: str) -> bool:
    """Whether ``key`` is a key anywhere in ``node``."""
    if isinstance(node, dict):
        return key in node or any(_mentions(v, key) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, key) for v in node)
    return False


def _jsonschema() -> Any:
    """The jsonschema library, imported on first use (why: see the end of ModelSchema.__init__)."""
    import jsonschema

    return jsonschema


# ---- quick tests ------------------------------------------------------------------------------
# A quick test may refuse a value the schema accepts (that value then goes to jsonschema, which
# decides and explains), but must never pass a value jsonschema would refuse. So type tests are exact where
# jsonschema is lenient (1.0 is an integer to it, not to a quick test), and a keyword applies
# to exactly the values jsonschema applies it to (a length to any str, a bound to any number).

_TYPE_TESTS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: type(v) is str,
    "integer": lambda v: type(v) is int,
    "number": lambda v: type(v) is int or type(v) is float,
    "boolean": lambda v: type(v) is bool,
    "array": lambda v: type(v) is list,
    "object": lambda v: type(v) is dict,
    "null": lambda v: v is None,
}
_BOUNDS: dict[str, Callable[[Any, Any], bool]] = {
    "minimum": operator.ge, "maximum": operator.le, "exclusiveMinimum": operator.gt, "exclusiveMaximum": operator.lt}
_LENGTHS: dict[str, tuple[type[Sized], Callable[[int, int], bool]]] = {
    "minLength": (str, operator.ge), "maxLength": (str, operator.le),
    "minItems": (list, operator.ge), "maxItems": (list, operator.le)}
# Keywords that constrain nothing (no format checker is used: formats are annotations here).
_ANNOTATIONS = {"title", "description", "examples", "default", "format", "$comment", "deprecated",
                "readOnly", "writeOnly"}
_QUICK_KEYWORDS = {"type", "enum", "items", *_BOUNDS, *_LENGTHS, *_ANNOTATIONS}
_SCALARS = (str, int, float, bool, type(None))


def quick_test(schema: Any) -> Callable[[Any], bool] | None:
    """A fast test that passes only values ``schema`` accepts; None when the schema uses
    anything it does not cover (then jsonschema checks every value)."""
    if not isinstance(schema, dict) or not set(schema) <= _QUICK_KEYWORDS:
        return None
    tests: list[Callable[[Any], bool]] = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not names or not all(isinstance(n, str) and n in _TYPE_TESTS for n in names):
            return None
        types = [_TYPE_TESTS[n] for n in names]
        tests.append(types[0] if len(types) == 1 else lambda v: any(t(v) for t in types))
    if "enum" in schema:
        if not isinstance(schema["enum"], list):
            return None
        # By type as well as value: True == 1 in Python, not in JSON Schema.
        allowed = {(type(e), e) for e in schema["enum"] if type(e) in _SCALARS}
        tests.append(lambda v: type(v) in _SCALARS and (type(v), v) in allowed)
    for word, op in _BOUNDS.items():
        if word in schema:
            bound = schema[word]
            if type(bound) not in (int, float):
                return None

            # A def, not a lambda with defaults (which mypy cannot type): the same function at run time.
            def within(v: Any, b: Any = bound, op: Callable[[Any, Any], bool] = op) -> bool:
                return _bound_ok(v, b, op)
            tests.append(within)
    for word, (kind, op) in _LENGTHS.items():
        if word in schema:
            size = schema[word]
            if type(size) is not int or size < 0:
                return None

            def sized(v: Any, n: int = size, kind: type[Sized] = kind, op: Callable[[int, int], bool] = op) -> bool:
                return not isinstance(v, kind) or op(len(v), n)
            tests.append(sized)
    if "items" in schema:
        item_test = quick_test(schema["items"])
        if item_test is None:
            return None
        tests.append(lambda v: not isinstance(v, list) or _each(item_test, v))
    if len(tests) == 1:
        return tests[0]

    def every(value: Any) -> bool:  # a plain loop: all() over a generator costs twice as much
        for test in tests:
            if not test(value):
                return False
        return True

    return every


def _each(test: Callable[[Any], bool], values: list[Any]) -> bool:
    for value in values:
        if not test(value):
            return False
    return True


def _bound_ok(value: Any, bound: int | float, op: Callable[[Any, Any], bool]) -> bool:
    if type(value) is int or type(value) is float:
        return op(value, bound)  # NaN fails every comparison: left to jsonschema
    # A bound applies to numbers only (not to True, which is no number to JSON Schema); other
    # number types (Decimal, Fraction) are left to jsonschema.
    return isinstance(value, bool) or not isinstance(value, numbers.Number)


# Keywords of an input schema that field-by-field checking covers (besides what it does by hand).
_PLAIN_KEYWORDS = {"type", "title", "description", "properties", "additionalProperties", "$schema", "$id",
                   "examples", "default"}
# Entries kept in each per-schema memo before it starts afresh; bounds memory on huge manifests.
_CACHE_LIMIT = 50_000


def _cache_key(value: Any) -> Any:
    """A hashable stand-in for a small value (the type too: True == 1 but is no integer), or None."""
    if isinstance(value, str):
        return ("str", value) if len(value) <= 256 else None
    if value is None or isinstance(value, bool | int | float):
        return (type(value).__name__, value)
    if isinstance(value, list) and len(value) <= 8:
        keys = tuple(_cache_key(v) for v in value)
        return ("list", keys) if None not in keys else None
    return None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]  # one rule not in a list: still a rule


def _path_label(path: list[Any]) -> str:
    """['image_urls', 0] -> 'image_urls[0]'."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _strip_validations(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_validations(v) for k, v in node.items() if k != "validations"}
    if isinstance(node, list):
        return [_strip_validations(v) for v in node]
    return node


def _guess_output_kind(model_id: str, data: dict[str, Any]) -> str:
    """For schemas without x-batchgen.output_kind: the model id says it ("image-to-video"),
    else an output schema that offers only videos."""
    mid = model_id.lower()
    if "to-video" in mid or mid.endswith("video"):
        return "video"
    if "to-image" in mid or mid.endswith("image"):
        return "image"
    out = data.get("output")
    out = out if isinstance(out, dict) else {}
    inner = out.get("output") if isinstance(out.get("output"), dict) else out
    props = set((inner.get("properties") or {}) if isinstance(inner, dict) else {})
    if props & {"video", "videos"} and not props & {"image", "images"}:
        return "video"
    return "video" if "video" in mid else "image"


@cache
def _load_cached(path: str) -> ModelSchema:
    return ModelSchema.load(path)


def find_schema(model_id: str, extra_path: str | Path | None = None) -> ModelSchema | None:
    """The schema for ``model_id``: ``extra_path`` (a ``--schema FILE``) if given, else the
    bundled file, else None (not bundled: the caller looks in RunComfy's catalog, catalog.py).
    Raises SchemaError for a file that cannot be used."""
    if extra_path is not None:
        return _load_cached(str(Path(extra_path).resolve()))
    path = MODELS_DIR / model_filename(model_id)
    if path.is_file():
        return _load_cached(str(path))
    return None


def bundled_schemas() -> list[ModelSchema]:
    """Every schema shipped in ``batchgen/models/``, by file name."""
    return [_load_cached(str(p)) for p in sorted(MODELS_DIR.glob("*.json"))]
