"""Constrained-decoding guides (serve/guides.py): every prefix of a valid document is viable, the
document itself is complete, invalid text is rejected at once, and `closing` turns any viable
prefix into a document that parses and satisfies the schema (what makes constrained tool-call
arguments and response_format output well-formed even when the token budget runs out)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.serve.guides import ChoiceGuide, JSONGuide, validate_schema

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
                         "kind": {"enum": ["cat", "dog", 3]}, "ok": {"type": ["boolean", "null"]},
                         "pos": {"$ref": "#/$defs/point"}},
          "required": ["name", "age", "kind"], "additionalProperties": False,
          "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}}}


def satisfies_person(v) -> bool:
    return (isinstance(v, dict) and set(v) <= set(PERSON["properties"]) and {"name", "age", "kind"} <= set(v)
            and isinstance(v["name"], str) and len(v["name"]) <= 12 and type(v["age"]) is int
            and v["kind"] in ("cat", "dog", 3) and v.get("ok", None) in (True, False, None)
            and (1 <= len(v.get("tags", ["x"])) <= 3 and all(isinstance(t, str) for t in v.get("tags", [])))
            and ("pos" not in v or (isinstance(v["pos"], dict) and isinstance(v["pos"]["x"], (int, float)))))


@settings(max_examples=150, deadline=None)
@given(json_values, st.sampled_from([(",", ":"), (", ", ": "), (",\n  ", ": ")]))
def test_every_prefix_of_valid_json_is_viable(value, separators):
    text = json.dumps(value, ensure_ascii=False, separators=separators)
    guide = JSONGuide()
    for n in range(len(text)):
        assert guide.check(text[:n])[0], (text, n)
    assert guide.check(text) == (True, True)
    assert not guide.check(text + "}")[0] and not guide.check(text + " x")[0]


@pytest.mark.parametrize("bad", ['{"a" 1', "[1,]", "{,", "tru e", "01", "-", '"\x01"', "{'a': 1}", "[1 2]",
                                 '{"a":1,}', "nul1", '"\\x"', "1.e5", "NaN", "[" + "1," * 3 + "]"])
def test_invalid_json_is_rejected(bad):
    guide = JSONGuide()
    viable, complete = guide.check(bad)
    assert not complete and (not viable or bad in ("-",))


def test_schema_rules():
    g = JSONGuide(PERSON)
    assert g.check('{"name":"x","age":3,"kind":"cat"}') == (True, True)
    assert not g.check('{"name":"x","age":3.5')[0]            # integer
    assert not g.check('{"nam":"x"')[0]                         # unknown key (additionalProperties false)
    assert not g.check('{"name":"x","name"')[0]                 # duplicate key
    assert not g.check('{"name":"x","age":3}')[0]               # required "kind" missing at the close
    assert not g.check('{"kind":"bird"')[0]                      # enum
    assert g.check('{"kind":3')[0] and not g.check('{"kind":4')[0]
    assert not g.check('{"tags":[]')[0] and not g.check('{"tags":["a","b","c",')[0]
    assert not g.check('{"name":"' + "x" * 13)[0]              # maxLength
    assert g.check('{"ok":null')[0] and not g.check('{"ok":1')[0]
    assert not g.check('{"pos":{"y"')[0] and g.check('{"pos":{"x":-1.5e3}')[0]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_closing_completes_any_viable_prefix(data):
    g = JSONGuide(PERSON)
    full = '{"name": "Ab\\u00e9 c", "tags": ["x", "y"], "age": -12, "ok": true, "pos": {"x": 2.5}, "kind": "dog"}'
    assert g.check(full) == (True, True)
    prefix = full[: data.draw(st.integers(0, len(full)))]
    closing = g.closing(prefix)
    assert closing is not None
    value = json.loads(prefix + closing)
    assert satisfies_person(value), prefix + closing


def test_closing_from_scratch_for_various_schemas():
    for schema in (None, {"type": "object"}, {"type": "array", "items": {"type": "integer"}, "minItems": 2},
                   {"type": "string"}, {"type": "number"}, {"enum": ["a", "b"]}, PERSON,
                   {"anyOf": [{"type": "integer"}, {"type": "string"}]}):
        closing = JSONGuide(schema).closing("")
        json.loads(closing)


def test_choice_guide():
    g = ChoiceGuide(['get_weather">\n', 'get_time">\n', 'search">\n'])
    assert g.check("get_") == (True, False) and g.check("x") == (False, False)
    assert g.check('search">\n') == (True, True)
    assert g.forced_prefix("") == "" and g.forced_prefix("g") == "et_"
    assert g.closing("get_t") == 'ime">\n'


def test_validate_schema():
    validate_schema(PERSON, "p")
    for bad in ({"type": "quux"}, {"$ref": "http://x"}, {"$ref": "#/$defs/missing"}, {"properties": []},
                {"required": "a"}, {"enum": []}, 3):
        with pytest.raises(ValueError):
            validate_schema(bad, "p")
