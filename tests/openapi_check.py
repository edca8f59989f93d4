"""docs/openapi.json as a test oracle: load it, find operations, check answers against it.

A JSON-schema validator for the subset the document uses (OpenAPI 3.0 flavour:
``nullable`` instead of type lists) and nothing more: ``$ref``, ``type`` (object, array,
string, integer, number, boolean), ``nullable``, ``enum``, ``properties``, ``required``,
``additionalProperties``, ``items``, ``pattern``, ``minLength``, ``maxLength``,
``minItems``, ``maxItems``, ``minimum``, ``maximum``. A keyword it does not know is an
error, so the document cannot promise a constraint that no test checks. Standard library
only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SPEC_PATH = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
CHECKED = {"$ref", "type", "nullable", "enum", "properties", "required",
           "additionalProperties", "items", "pattern", "minLength", "maxLength", "minimum",
           "maximum", "minItems", "maxItems"}
ANNOTATIONS = {"description", "title", "format", "example", "default"}


class SchemaError(AssertionError):
    """A value that does not fit the document, or a document the validator cannot read."""


def load(path: Path = SPEC_PATH) -> dict[str, Any]:
    """The OpenAPI document."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` (local references only) until a node without one."""
    seen = 0
    while "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise SchemaError(f"only local references are supported: {ref}")
        target: Any = spec
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
        seen += 1
        if seen > 32:
            raise SchemaError(f"reference loop at {ref}")
    return node


def validate(spec: dict[str, Any], schema: dict[str, Any], value: Any, where: str = "$") -> None:
    """Raise SchemaError naming the first place ``value`` does not fit ``schema``."""
    schema = resolve(spec, schema)
    unknown = set(schema) - CHECKED - ANNOTATIONS
    if unknown:
        raise SchemaError(f"{where}: the schema uses keywords this validator does not check: "
                          f"{', '.join(sorted(unknown))}")
    if value is None:
        if schema.get("nullable"):
            return
        if "type" in schema:
            raise SchemaError(f"{where}: null where {schema['type']} is required")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{where}: {value!r:.80} is not one of {schema['enum']}")
    kind = schema.get("type")
    if kind is not None:
        _check_type(kind, value, where)
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise SchemaError(f"{where}: {value!r:.80} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", len(value)):
            raise SchemaError(f"{where}: longer than {schema['maxLength']}")
        if len(value) < schema.get("minLength", 0):
            raise SchemaError(f"{where}: shorter than {schema['minLength']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(f"{where}: {value} is below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError(f"{where}: {value} is above {schema['maximum']}")
    if isinstance(value, dict):
        _check_object(spec, schema, value, where)
    if isinstance(value, list) and not (schema.get("minItems", 0) <= len(value)
                                        <= schema.get("maxItems", len(value))):
        raise SchemaError(f"{where}: {len(value)} items, outside "
                          f"{schema.get('minItems', 0)}..{schema.get('maxItems', 'any')}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(spec, schema["items"], item, f"{where}[{i}]")


def _check_type(kind: str, value: Any, where: str) -> None:
    ok = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer()),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }.get(kind)
    if ok is None:
        raise SchemaError(f"{where}: unknown type {kind!r} in the schema")
    if not ok(value):
        raise SchemaError(f"{where}: {type(value).__name__} {value!r:.80} is not {kind}")


def _check_object(spec: dict[str, Any], schema: dict[str, Any], value: dict[str, Any],
                  where: str) -> None:
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            raise SchemaError(f"{where}: required property {name!r} is missing")
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in props:
            validate(spec, props[name], item, f"{where}.{name}")
        elif extra is False:
            raise SchemaError(f"{where}: property {name!r} is not in the document")
        elif isinstance(extra, dict):
            validate(spec, extra, item, f"{where}.{name}")


def operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    """Every (METHOD, path template) the document describes."""
    return {(method.upper(), path) for path, item in spec["paths"].items()
            for method in item if method in METHODS}


def operation(spec: dict[str, Any], method: str, template: str) -> dict[str, Any]:
    try:
        return spec["paths"][template][method.lower()]
    except KeyError:
        raise SchemaError(f"{method} {template} is not in the document") from None


def template_of(spec: dict[str, Any], path: str) -> str | None:
    """The documented template a concrete path falls under (``{x}`` is one segment)."""
    segments = path.split("?", 1)[0].split("/")
    for template in spec["paths"]:
        parts = template.split("/")
        if len(parts) == len(segments) and all(
                p.startswith("{") or p == s for p, s in zip(parts, segments)):
            return template
    return None


def check_response(spec: dict[str, Any], response: dict[str, Any], status: int,
                   content_type: str, body: bytes) -> Any:
    """Check one answer against one documented response object; return the decoded body
    (JSON) or its text."""
    response = resolve(spec, response)
    content = response.get("content", {})
    media = content.get(content_type)
    if media is None:  # allow parameters the document did not spell out
        base = content_type.split(";", 1)[0].strip()
        media = next((m for t, m in content.items() if t.split(";", 1)[0].strip() == base),
                     None)
    if media is None:
        raise SchemaError(f"status {status}: content type {content_type!r} is not documented "
                          f"(documented: {', '.join(content) or 'none'})")
    if content_type.split(";", 1)[0].strip() == "application/json":
        try:
            value: Any = json.loads(body)
        except ValueError as exc:
            raise SchemaError(f"status {status}: body is not JSON: {exc}") from None
    else:
        value = body.decode("utf-8")
    validate(spec, media["schema"], value)
    return value


def check_answer(spec: dict[str, Any], method: str, template: str, status: int,
                 content_type: str, body: bytes) -> Any:
    """Check that ``status`` is documented for the operation and the body fits its schema."""
    responses = operation(spec, method, template)["responses"]
    response = responses.get(str(status), responses.get("default"))
    if response is None:
        raise SchemaError(f"{method} {template}: status {status} is not documented "
                          f"(documented: {', '.join(sorted(responses))})")
    return check_response(spec, response, status, content_type, body)


def check_generic(spec: dict[str, Any], name: str, status: int, content_type: str,
                  body: bytes) -> Any:
    """Check an answer that belongs to no operation (unknown path, wrong method) against
    the shared response ``components/responses/<name>``."""
    return check_response(spec, {"$ref": f"#/components/responses/{name}"}, status,
                          content_type, body)
