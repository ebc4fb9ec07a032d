"""Model schemas as data: RunComfy's JSON Schema for a model's input, plus its `validations` rules.

Adding a model is adding a file to ``batchgen/models/`` (or passing ``--schema FILE``): nothing
here names a model. ``check`` is pure: image facts come in already probed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from .errors import BatchgenError
from .images import ImageInfo

MODELS_DIR = Path(__file__).parent / "models"

# A "MB" in a file_size_mb rule is 10^6 bytes: the stricter reading (4.7 MB = 4,700,000 bytes,
# smaller than 4.7 MiB), so no file we accept can be refused by a service that means MiB.
BYTES_PER_MB = 1_000_000

IMAGE_FORMATS = ("image_uri", "image_uris")

_RULE = re.compile(r"^\s*(file_size_mb|width_pixels|height_pixels|width/height|file_type)\s*"
                   r"(<=|>=|==|<|>|_in)\s*$")
_OPS = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
}
_OP_WORDS = {"<": "under", "<=": "at most", ">": "over", ">=": "at least", "==": "exactly"}


class SchemaError(BatchgenError):
    """A model schema file cannot be read or is not a RunComfy schema."""


@dataclass(frozen=True)
class Rule:
    subject: str
    op: str
    value: Any
    message: str


def model_filename(model_id: str) -> str:
    return model_id.strip("/").replace("/", "--") + ".json"


class ModelSchema:
    """One model's input schema and the checks it implies."""

    def __init__(self, data: dict[str, Any], source: str = ""):
        if not isinstance(data, dict) or not isinstance(data.get("input"), dict):
            raise SchemaError(f"{source or 'schema'}: no 'input' object; not a RunComfy model schema")
        self.data = data
        self.source = source
        self.model_id: str = str(data.get("model_id") or "")
        self.input_schema: dict[str, Any] = data["input"]
        self.properties: dict[str, Any] = self.input_schema.get("properties") or {}
        self.required: list[str] = list(self.input_schema.get("required") or [])
        extra = data.get("x-batchgen") or {}
        self.base_price_usd: float | None = extra.get("base_price_usd")
        kind = extra.get("output_kind")
        if kind not in ("video", "image"):
            kind = "video" if "video" in self.model_id.lower() else "image"
        self.output_kind: str = kind
        # The JSON Schema part, without RunComfy's custom keyword (jsonschema ignores unknown
        # keywords anyway; removing it keeps error messages short).
        self._validator = jsonschema.Draft202012Validator(
            {**_strip_validations(self.input_schema), "additionalProperties": False}
        )
        self._rules = {name: _parse_rules(prop) for name, prop in self.properties.items()}
        quick_ok = set(self.input_schema) <= _QUICK_TOP and all(
            _quick_supported(p) for p in self.properties.values())
        self._quick: dict[str, Any] | None = self.properties if quick_ok else None

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

    def image_fields(self) -> dict[str, bool]:
        """Fields that hold image URLs: name -> True when the field is a list of them."""
        found = {}
        for name, prop in self.properties.items():
            fmt = prop.get("format")
            items = prop.get("items") or {}
            if prop.get("type") == "array" and (items.get("format") in IMAGE_FORMATS or fmt in IMAGE_FORMATS):
                found[name] = True
            elif fmt == "image_uris":
                found[name] = True
            elif fmt == "image_uri":
                found[name] = False
        return found

    def field_type(self, name: str) -> str | None:
        t = (self.properties.get(name) or {}).get("type")
        return t if isinstance(t, str) else None

    def apply_defaults(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults of optional fields only. Required fields' defaults are RunComfy's
        playground examples (a sample prompt and image), never something to send."""
        out = dict(inputs)
        for name, prop in self.properties.items():
            if name not in out and name not in self.required and "default" in prop:
                out[name] = prop["default"]
        return out

    def check(self, inputs: dict[str, Any], images: dict[str, ImageInfo | str]) -> list[tuple[str, str]]:
        """Every problem with one job's inputs as (field, message). ``images`` maps each image
        reference found in the inputs to its probed facts, or to the probe's error message."""
        problems: list[tuple[str, str]] = []
        # The quick check says "valid" for almost every job of a big manifest in a few
        # microseconds; only a job it doubts pays for jsonschema and its precise messages.
        if not self._quick_valid(inputs):
            for err in sorted(self._validator.iter_errors(inputs), key=lambda e: list(e.path)):
                problems.append(self._describe(err))
        for name, is_list in self.image_fields().items():
            value = inputs.get(name)
            refs = value if is_list and isinstance(value, list) else [value] if isinstance(value, str) else []
            for i, ref in enumerate(refs):
                if not isinstance(ref, str):
                    continue
                label = f"{name}[{i}]" if is_list else name
                info = images.get(ref)
                if info is None:
                    continue
                if isinstance(info, str):
                    problems.append((label, f"{ref}: {info}"))
                    continue
                for rule in self._rules.get(name, []):
                    msg = _apply_rule(rule, info)
                    if msg:
                        problems.append((label, msg))
        for name, rules in self._rules.items():
            for rule in rules:
                if rule.subject == "?":
                    problems.append((name, f"schema rule {rule.op!r} is not understood by batchgen; "
                                           "update batchgen or remove the rule"))
        return problems

    def _quick_valid(self, inputs: dict[str, Any]) -> bool:
        """True only when the inputs certainly satisfy the JSON Schema part. Conservative: any
        keyword it does not know sends the job to jsonschema."""
        if self._quick is None:
            return False
        for name in self.required:
            if name not in inputs:
                return False
        for name, value in inputs.items():
            prop = self._quick.get(name)
            if prop is None or not _quick_value_ok(prop, value):
                return False
        return True

    def _describe(self, err: jsonschema.ValidationError) -> tuple[str, str]:
        field = ".".join(str(p) for p in err.path)
        v = err.validator
        if v == "required":
            missing = err.message.split("'")[1] if "'" in err.message else err.message
            return missing, f"is required ({self._allowed_text(missing)})"
        if v == "additionalProperties":
            inst = err.instance if isinstance(err.instance, dict) else {}
            extra = ", ".join(sorted(set(inst) - set(self.properties)))
            return extra or field, f"unknown field; allowed: {', '.join(self.properties)}"
        if v == "maxLength":
            return field, f"is {len(err.instance)} characters; at most {err.validator_value} allowed"
        if v == "minLength":
            return field, f"is {len(err.instance)} characters; at least {err.validator_value} required"
        if v == "enum":
            allowed = ", ".join(json.dumps(x) for x in err.validator_value)
            return field, f"must be one of {allowed}, got {json.dumps(err.instance)}"
        if v == "type":
            return field, f"must be of type {err.validator_value}, got {json.dumps(err.instance)}"
        if v == "minItems":
            return field, f"has {len(err.instance)} item(s); at least {err.validator_value} required"
        if v == "maxItems":
            return field, f"has {len(err.instance)} item(s); at most {err.validator_value} allowed"
        if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            return field, err.message
        return field, err.message

    def _allowed_text(self, name: str) -> str:
        prop = self.properties.get(name) or {}
        desc = prop.get("description") or prop.get("title") or ""
        t = prop.get("type", "value")
        return f"{t}{': ' + desc if desc else ''}"


_QUICK_TOP = {"type", "title", "description", "required", "properties"}
_QUICK_KEYS = {"type", "title", "description", "default", "format", "validations", "maxLength", "minLength",
               "enum", "minItems", "maxItems", "items", "minimum", "maximum"}
_TYPES: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _quick_supported(prop: Any) -> bool:
    if not isinstance(prop, dict) or not set(prop) <= _QUICK_KEYS:
        return False
    if "type" in prop and prop["type"] not in _TYPES:
        return False
    items = prop.get("items")
    return items is None or _quick_supported(items)


def _quick_value_ok(prop: dict[str, Any], value: Any) -> bool:
    t = prop.get("type")
    if t is not None and not _TYPES[t](value):
        return False
    if "enum" in prop and not any(value == e and type(value) is type(e) for e in prop["enum"]):
        return False
    if isinstance(value, str):
        if "maxLength" in prop and len(value) > prop["maxLength"]:
            return False
        if "minLength" in prop and len(value) < prop["minLength"]:
            return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in prop and value < prop["minimum"]:
            return False
        if "maximum" in prop and value > prop["maximum"]:
            return False
    if isinstance(value, list):
        if "minItems" in prop and len(value) < prop["minItems"]:
            return False
        if "maxItems" in prop and len(value) > prop["maxItems"]:
            return False
        items = prop.get("items")
        if items is not None and not all(_quick_value_ok(items, v) for v in value):
            return False
    return True


def _strip_validations(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_validations(v) for k, v in node.items() if k != "validations"}
    if isinstance(node, list):
        return [_strip_validations(v) for v in node]
    return node


def _parse_rules(prop: dict[str, Any]) -> list[Rule]:
    rules = []
    raw = list(prop.get("validations") or []) + list((prop.get("items") or {}).get("validations") or [])
    for item in raw:
        text = str(item.get("validation_rule", ""))
        m = _RULE.match(text)
        message = str(item.get("validation_error") or text)
        if not m:
            rules.append(Rule("?", text, item.get("validation_value"), message))
            continue
        rules.append(Rule(m.group(1), m.group(2), item.get("validation_value"), message))
    return rules


def _apply_rule(rule: Rule, info: ImageInfo) -> str | None:
    """None when the image passes; else what is wrong and what is allowed."""
    if rule.subject == "?":
        return None
    if rule.subject == "file_type":
        allowed = [str(x).lower() for x in (rule.value or [])]
        if "jpg" in allowed:
            allowed.append("jpeg")
        if info.format in allowed:
            return None
        return f"image is {info.format.upper()}; {rule.message} (allowed: {', '.join(a.upper() for a in allowed)})"
    op = _OPS.get(rule.op)
    if op is None:
        return f"unsupported operator {rule.op!r} in schema rule"
    if rule.subject == "file_size_mb":
        limit = float(rule.value) * BYTES_PER_MB
        if op(info.size, limit):
            return None
        return (f"image is {info.size:,} bytes; {rule.message} "
                f"({_OP_WORDS[rule.op]} {int(limit):,} bytes, 1 MB = 1,000,000 bytes)")
    if rule.subject == "width_pixels":
        if op(info.width, rule.value):
            return None
        return f"image is {info.width} px wide; {rule.message} (width must be {_OP_WORDS[rule.op]} {rule.value})"
    if rule.subject == "height_pixels":
        if op(info.height, rule.value):
            return None
        return f"image is {info.height} px high; {rule.message} (height must be {_OP_WORDS[rule.op]} {rule.value})"
    if rule.subject == "width/height":
        ratio = info.width / info.height if info.height else float("inf")
        if op(ratio, rule.value):
            return None
        return (f"image is {info.width}x{info.height} (width/height {ratio:.4g}); {rule.message} "
                f"(width/height must be {_OP_WORDS[rule.op]} {rule.value})")
    return None


@cache
def _load_cached(path: str) -> ModelSchema:
    return ModelSchema.load(path)


def find_schema(model_id: str, extra_path: str | Path | None = None) -> ModelSchema | None:
    """The schema for ``model_id``: ``extra_path`` if given, else the bundled file, else None
    (an unknown model: its inputs pass unchecked, apart from image probing)."""
    if extra_path is not None:
        return _load_cached(str(Path(extra_path).resolve()))
    path = MODELS_DIR / model_filename(model_id)
    if path.exists():
        return _load_cached(str(path))
    return None


def bundled_schemas() -> list[ModelSchema]:
    return [_load_cached(str(p)) for p in sorted(MODELS_DIR.glob("*.json"))]
