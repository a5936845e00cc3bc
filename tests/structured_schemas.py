"""A suite of JSON schemas for the structured-output tests: nested objects, arrays with bounds, enums, anyOf,
required and optional properties, string patterns and formats, numbers with ranges, $defs."""

from typing import Any

_SHORT = {"type": "string", "maxLength": 12}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": _SHORT, "age": {"type": "integer"}, "active": {"type": "boolean"}},
        "required": ["name", "age", "active"],
    },
    "all_optional": {"type": "object", "properties": {"a": {"type": "integer"}, "b": _SHORT}},
    "some_required": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "label": _SHORT, "score": {"type": "number"}},
        "required": ["id"],
    },
    "integer_range": {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 20}},
        "required": ["n"],
    },
    "number_range": {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
        "required": ["x"],
    },
    "exclusive_range": {
        "type": "object",
        "properties": {"p": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}},
        "required": ["p"],
    },
    "string_enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    "mixed_enum": {"type": "object", "properties": {"v": {"enum": [1, "two", None, True]}}, "required": ["v"]},
    "const": {
        "type": "object",
        "properties": {"kind": {"const": "point"}, "x": {"type": "integer"}},
        "required": ["kind", "x"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": _SHORT,
                    "address": {
                        "type": "object",
                        "properties": {"city": _SHORT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["user"],
    },
    "deep_nesting": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"type": "object", "properties": {"d": {"type": "integer"}}}},
                        "required": ["c"],
                    }
                },
                "required": ["b"],
            }
        },
        "required": ["a"],
    },
    "array_bounds": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": _SHORT, "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
    },
    "array_exact": {
        "type": "object",
        "properties": {"rgb": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3}},
        "required": ["rgb"],
    },
    "array_max_only": {
        "type": "object",
        "properties": {"xs": {"type": "array", "items": {"type": "number"}, "maxItems": 2}},
        "required": ["xs"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": _SHORT, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["sku", "qty"],
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["items"],
    },
    "top_level_array": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 5},
    "array_of_enums": {
        "type": "array",
        "items": {"enum": ["x", "y", "z"]},
        "minItems": 1,
        "maxItems": 3,
    },
    "tuple_prefix_items": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 8}, {"type": "integer"}],
        "items": False,
        "minItems": 2,
    },
    "any_of_scalars": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 6}]}},
        "required": ["value"],
    },
    "any_of_objects": {
        "type": "object",
        "properties": {
            "shape": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"circle": {"type": "number"}},
                        "required": ["circle"],
                        "additionalProperties": False,
                    },
                    {
                        "type": "object",
                        "properties": {"w": {"type": "integer"}, "h": {"type": "integer"}},
                        "required": ["w", "h"],
                        "additionalProperties": False,
                    },
                ]
            }
        },
        "required": ["shape"],
    },
    "nullable": {
        "type": "object",
        "properties": {"note": {"type": ["string", "null"], "maxLength": 10}},
        "required": ["note"],
    },
    "string_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
    },
    "string_lengths": {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 6}},
        "required": ["word"],
    },
    "format_date": {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"],
    },
    "format_email": {
        "type": "object",
        "properties": {"email": {"type": "string", "format": "email", "maxLength": 30}},
        "required": ["email"],
    },
    "format_uuid": {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"}},
        "required": ["id"],
    },
    "no_additional": {
        "type": "object",
        "properties": {"k": {"type": "integer"}},
        "required": ["k"],
        "additionalProperties": False,
    },
    "defs_ref": {
        "type": "object",
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}},
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "boolean_only": {"type": "boolean"},
    "integer_only": {"type": "integer", "minimum": 0, "maximum": 1000},
    "enum_only": {"enum": ["yes", "no", "maybe"]},
    "object_of_arrays": {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "required": ["matrix"],
    },
    "one_of": {
        "type": "object",
        "properties": {"id": {"oneOf": [{"type": "integer"}, {"type": "string", "pattern": "^id-[0-9]{3}$"}]}},
        "required": ["id"],
    },
}
