"""Text guides for constrained decoding: which texts can still grow into a valid output.

A guide answers `check(text) -> (viable, complete)`: viable when some continuation of `text` is
valid, complete when `text` itself is. Decoding under a guide keeps only tokens whose text leaves
the output viable (see generation.py), and `closing(text)` finds a short continuation that completes
the output, used when the token budget runs low or no proposed token fits.

- `ChoiceGuide(options)`: exactly one of the given strings (tool names, parameter tags, enums).
- `JSONGuide(schema)`: one JSON value; with a schema, of that schema. Enforced: type (also unions
  and `anyOf`/`oneOf`), `enum`/`const`, object `properties` (only the declared keys unless
  `additionalProperties` allows more; every `required` key before the closing brace; no duplicate
  keys), array `items`/`prefixItems`/`minItems`/`maxItems`, string `minLength`/`maxLength`, local
  `$ref`s (`#/$defs/...`, `#/definitions/...`). Not enforced: `pattern`, `format`, numeric bounds.
  Whitespace between tokens is allowed in runs of at most `max_ws` characters, so a model cannot
  stall by emitting whitespace forever. Nothing may follow the value.
"""
from __future__ import annotations

import json
import string
from typing import Any

_WS = " \t\n\r"
_MAX_DEPTH = 32
_MAX_NUMBER_DIGITS = 24
_ANY: dict = {}


class ChoiceGuide:
    def __init__(self, options: list[str]):
        if not options:
            raise ValueError("a choice needs at least one option")
        self.options = list(dict.fromkeys(options))

    def check(self, text: str) -> tuple[bool, bool]:
        return any(o.startswith(text) for o in self.options), text in self.options

    def may_extend(self, text: str) -> bool:
        return any(len(o) > len(text) and o.startswith(text) for o in self.options)

    def closing(self, text: str) -> str | None:
        fits = [o for o in self.options if o.startswith(text)]
        return min(fits, key=len)[len(text):] if fits else None

    def forced_prefix(self, text: str) -> str:
        """The text every remaining option continues with (no model choice needed)."""
        fits = [o[len(text):] for o in self.options if o.startswith(text)]
        if not fits:
            return ""
        prefix = fits[0]
        for f in fits[1:]:
            n = 0
            while n < min(len(prefix), len(f)) and prefix[n] == f[n]:
                n += 1
            prefix = prefix[:n]
        return prefix


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class JSONGuide:
    def __init__(self, schema: dict | bool | None = None, max_ws: int = 16):
        if schema is None or schema is True:
            schema = _ANY
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be an object")
        self.root = schema
        self.max_ws = max_ws
        extra = set()
        _collect_chars(schema, extra)
        base = '"}]0:,' + string.digits + string.ascii_letters + "{[-.+ " + string.punctuation
        self.alphabet = "".join(dict.fromkeys(base + "".join(sorted(extra))))

    # ----- public
    def check(self, text: str) -> tuple[bool, bool]:
        ends, partial = self._value(text, 0, self.root, 0)
        complete = len(text) in ends
        return partial or complete, complete

    def may_extend(self, text: str) -> bool:
        """A complete text that could still grow (only a bare top-level number can)."""
        return bool(text) and text[-1].isdigit()

    def closing(self, text: str, limit: int = 512) -> str | None:
        """A short continuation making `text` complete: greedily the first viable character of a
        fixed preference order (closing quotes and brackets first), or None if there is none."""
        out = ""
        for _ in range(limit):
            viable, complete = self.check(text + out)
            if complete:
                return out
            if not viable:
                return None
            for ch in self.alphabet:
                if self.check(text + out + ch)[0]:
                    out += ch
                    break
            else:
                return None
        return None

    # ----- parsing: each returns (positions where a complete value can end, input ended while viable)
    def _ws(self, s: str, j: int) -> int | None:
        k = j
        while k < len(s) and s[k] in _WS:
            k += 1
        return None if k - j > self.max_ws else k

    def _resolve(self, schema: Any) -> Any:
        seen = 0
        while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and seen < 16:
            ref = schema["$ref"]
            target: Any = None
            if ref.startswith("#/"):
                target = self.root
                for part in ref[2:].split("/"):
                    target = target.get(part) if isinstance(target, dict) else None
            elif ref == "#":
                target = self.root
            if not isinstance(target, dict):
                return _ANY
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest}
            seen += 1
        return schema

    def _value(self, s: str, i: int, schema: Any, depth: int) -> tuple[set[int], bool]:
        if schema is False or depth > _MAX_DEPTH:
            return set(), False
        if schema is True or schema is None:
            schema = _ANY
        schema = self._resolve(schema)
        if i >= len(s):
            return set(), True
        if "enum" in schema or "const" in schema:
            options = schema["enum"] if "enum" in schema else [schema["const"]]
            return _literals(s, i, [_to_json(o) for o in options])
        alternatives = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(alternatives, list) and alternatives:
            base = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
            return self._union(s, i, [{**base, **a} if isinstance(a, dict) else a for a in alternatives], depth)
        if isinstance(schema.get("allOf"), list):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                if isinstance(part, dict):
                    merged = _merge(merged, self._resolve(part))
            return self._value(s, i, merged, depth)
        types = schema.get("type")
        if isinstance(types, list):
            return self._union(s, i, [{**schema, "type": t} for t in types], depth)
        if types is None:
            if "properties" in schema or "required" in schema or "additionalProperties" in schema:
                types = "object"
            elif "items" in schema or "prefixItems" in schema:
                types = "array"
        c = s[i]
        if types is None:
            if c == "{":
                return self._object(s, i, schema, depth)
            if c == "[":
                return self._array(s, i, schema, depth)
            if c == '"':
                return self._string(s, i, schema)
            if c == "-" or c.isdigit():
                return self._number(s, i, integer=False)
            return _literals(s, i, ["true", "false", "null"])
        if types == "object":
            return self._object(s, i, schema, depth) if c == "{" else (set(), False)
        if types == "array":
            return self._array(s, i, schema, depth) if c == "[" else (set(), False)
        if types == "string":
            return self._string(s, i, schema) if c == '"' else (set(), False)
        if types in ("number", "integer"):
            return self._number(s, i, integer=types == "integer")
        if types == "boolean":
            return _literals(s, i, ["true", "false"])
        if types == "null":
            return _literals(s, i, ["null"])
        return set(), False

    def _union(self, s, i, schemas, depth):
        ends, partial = set(), False
        for alt in schemas:
            e, p = self._value(s, i, alt, depth)
            ends |= e
            partial = partial or p
        return ends, partial

    def _string(self, s: str, i: int, schema: dict) -> tuple[set[int], bool]:
        min_len = schema.get("minLength", 0)
        max_len = schema.get("maxLength")
        j, count = i + 1, 0
        while j < len(s):
            c = s[j]
            if c == '"':
                return ({j + 1} if count >= min_len else set()), False
            if c == "\\":
                if j + 1 >= len(s):
                    return set(), True
                e = s[j + 1]
                if e in '"\\/bfnrt':
                    j += 2
                elif e == "u":
                    digits = s[j + 2:j + 6]
                    if not all(d in string.hexdigits for d in digits):
                        return set(), False
                    if len(digits) < 4:
                        return set(), True
                    j += 6
                else:
                    return set(), False
            elif ord(c) < 0x20:
                return set(), False
            else:
                j += 1
            count += 1
            if max_len is not None and count > max_len:
                return set(), False
        return set(), True

    def _number(self, s: str, i: int, integer: bool) -> tuple[set[int], bool]:
        n, j = len(s), i
        if s[j] == "-":
            j += 1
            if j == n:
                return set(), True
        if s[j] == "0":
            j += 1
        elif s[j] in "123456789":
            k = j
            while j < n and s[j].isdigit():
                j += 1
            if j - k > _MAX_NUMBER_DIGITS:
                return set(), False
        else:
            return set(), False
        if j == n:
            return {j}, True
        if integer or s[j] not in ".eE":
            return {j}, False
        if s[j] == ".":
            j += 1
            k = j
            while j < n and s[j].isdigit():
                j += 1
            if j - k > _MAX_NUMBER_DIGITS:
                return set(), False
            if j == k:
                return set(), j == n
            if j == n:
                return {j}, True
        if s[j] in "eE":
            j += 1
            if j < n and s[j] in "+-":
                j += 1
            k = j
            while j < n and s[j].isdigit() and j - k < 4:
                j += 1
            if j == k:
                return set(), j == n
            if j == n:
                return {j}, True
        return {j}, False

    def _object(self, s: str, i: int, schema: dict, depth: int) -> tuple[set[int], bool]:
        props = dict(schema.get("properties")) if isinstance(schema.get("properties"), dict) else {}
        required = [k for k in schema.get("required", []) if isinstance(k, str)]
        for key in required:  # a required key the schema does not describe: any value
            props.setdefault(key, _ANY)
        extra = schema.get("additionalProperties", None if props else True)
        restricted = bool(props) and not (extra is True or isinstance(extra, dict))
        if not props and extra is False:
            restricted = True

        def value_schema(key: str):
            if key in props:
                return props[key]
            return extra if isinstance(extra, dict) else _ANY

        def after_open(j: int):
            j = self._ws(s, j)
            if j is None:
                return set(), False
            if j == len(s):
                return set(), True
            if s[j] == "}":
                return ({j + 1} if not required else set()), False
            return member(j, frozenset())

        def member(j: int, used: frozenset):
            if s[j] != '"':
                return set(), False
            ends, partial = set(), False
            if restricted:
                keys = [k for k in props if k not in used]
                if not keys:
                    return set(), False
                key_ends, key_partial = _literals(s, j, [_to_json(k) for k in keys])
                partial = key_partial
                found = []
                for e in key_ends:
                    found.append((e, json.loads(s[j:e])))
            else:
                key_ends, key_partial = self._string(s, j, _ANY)
                partial = key_partial
                found = []
                for e in key_ends:
                    key = json.loads(s[j:e])
                    if key not in used:
                        found.append((e, key))
            for e, key in found:
                k = self._ws(s, e)
                if k is None:
                    continue
                if k == len(s):
                    partial = True
                    continue
                if s[k] != ":":
                    continue
                v = self._ws(s, k + 1)
                if v is None:
                    continue
                if v == len(s):
                    partial = True
                    continue
                v_ends, v_partial = self._value(s, v, value_schema(key), depth + 1)
                partial = partial or v_partial
                for ve in v_ends:
                    e2, p2 = after_value(ve, used | {key})
                    ends |= e2
                    partial = partial or p2
            return ends, partial

        def after_value(j: int, used: frozenset):
            j = self._ws(s, j)
            if j is None:
                return set(), False
            if j == len(s):
                return set(), True
            if s[j] == "}":
                return ({j + 1} if all(k in used for k in required) else set()), False
            if s[j] == ",":
                k = self._ws(s, j + 1)
                if k is None:
                    return set(), False
                if k == len(s):
                    return set(), not restricted or any(p not in used for p in props)
                return member(k, used)
            return set(), False

        return after_open(i + 1)

    def _array(self, s: str, i: int, schema: dict, depth: int) -> tuple[set[int], bool]:
        items = schema.get("items", _ANY)
        prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
        min_items = schema.get("minItems", 0)
        max_items = schema.get("maxItems")

        def item_schema(n: int):
            if n < len(prefix):
                return prefix[n]
            return items if isinstance(items, (dict, bool)) else _ANY

        def item(j: int, n: int):
            ends, partial = set(), False
            v_ends, v_partial = self._value(s, j, item_schema(n), depth + 1)
            partial = v_partial
            for ve in v_ends:
                e2, p2 = after_item(ve, n + 1)
                ends |= e2
                partial = partial or p2
            return ends, partial

        def after_item(j: int, n: int):
            j = self._ws(s, j)
            if j is None:
                return set(), False
            if j == len(s):
                return set(), True
            if s[j] == "]":
                return ({j + 1} if n >= min_items else set()), False
            if s[j] == "," and (max_items is None or n < max_items):
                k = self._ws(s, j + 1)
                if k is None:
                    return set(), False
                if k == len(s):
                    return set(), True
                return item(k, n)
            return set(), False

        j = self._ws(s, i + 1)
        if j is None:
            return set(), False
        if j == len(s):
            return set(), True
        if s[j] == "]":
            return ({j + 1} if min_items <= 0 else set()), False
        if max_items == 0:
            return set(), False
        return item(j, 0)


def _literals(s: str, i: int, options: list[str]) -> tuple[set[int], bool]:
    rest = s[i:]
    ends = {i + len(o) for o in options if rest.startswith(o)}
    partial = any(len(rest) < len(o) and o.startswith(rest) for o in options)
    return ends, partial


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if k == "properties" and isinstance(out.get(k), dict) and isinstance(v, dict):
            out[k] = {**out[k], **v}
        elif k == "required" and isinstance(out.get(k), list) and isinstance(v, list):
            out[k] = list(dict.fromkeys(out[k] + v))
        else:
            out[k] = v
    return out


def _collect_chars(schema: Any, out: set) -> None:
    """Characters of enum values and property names: the closer may need to spell them."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("enum", "const"):
                for v in value if key == "enum" and isinstance(value, list) else [value]:
                    out.update(_to_json(v))
            elif key == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    out.update(_to_json(name))
                    _collect_chars(sub, out)
            else:
                _collect_chars(value, out)
    elif isinstance(schema, list):
        for v in schema:
            _collect_chars(v, out)


def validate_schema(schema: Any, where: str) -> None:
    """Reject what the guide cannot honour: a non-object schema or unknown local references."""
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{where} must be a JSON schema object")
    guide = JSONGuide(schema if isinstance(schema, dict) else None)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
                    raise ValueError(f"{where}: only local $ref (#/...) is supported, got {ref!r} at {path}")
                target: Any = guide.root
                for part in ref[2:].split("/") if ref != "#" else []:
                    target = target.get(part) if isinstance(target, dict) else None
                if not isinstance(target, dict):
                    raise ValueError(f"{where}: $ref {ref!r} at {path} points nowhere")
            t = node.get("type")
            known = {"object", "array", "string", "number", "integer", "boolean", "null"}
            if t is not None and not (t in known if isinstance(t, str) else
                                      isinstance(t, list) and t and all(isinstance(x, str) and x in known for x in t)):
                raise ValueError(f"{where}: unknown type {t!r} at {path}")
            if "properties" in node and not isinstance(node["properties"], dict):
                raise ValueError(f"{where}: properties at {path} must be an object")
            if "required" in node and not (isinstance(node["required"], list)
                                           and all(isinstance(r, str) for r in node["required"])):
                raise ValueError(f"{where}: required at {path} must be a list of property names")
            if "enum" in node and not (isinstance(node["enum"], list) and node["enum"]):
                raise ValueError(f"{where}: enum at {path} must be a non-empty list")
            for key, value in node.items():
                if key not in ("enum", "const", "default", "examples"):
                    walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for n, value in enumerate(node):
                walk(value, f"{path}[{n}]")

    walk(schema, "schema")
