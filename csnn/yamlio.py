"""YAML as users write it: PyYAML's safe loader, but a key given twice is an error
(PyYAML silently keeps the last one, so `T: 4 ... T: 8` would lose the 4 unseen),
and so is an integer with a leading zero (YAML 1.1 reads `010` as octal 8) or a
base-60 number (`6:40` is 400 in YAML 1.1).
Merge keys (`<<: *common`) work as YAML defines them: a key written in the mapping
overrides a merged one, and of `<<: [*a, *b]` the first one's keys win; one `<<` a mapping."""
from __future__ import annotations

import re

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen, merge = {}, None
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # what << brings in may be overridden; SafeLoader flattens it
                if merge is not None:  # YAML allows one: PyYAML would quietly apply both
                    raise yaml.constructor.ConstructorError(
                        None, None, f"<< is given twice: on line {merge + 1} and on line {key_node.start_mark.line + 1}; "
                        "merge several mappings with one: <<: [*first, *second] (the first one's keys win)",
                        key_node.start_mark)
                merge = key_node.start_mark.line
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice: on line {first + 1} and on line "
                    f"{key_node.start_mark.line + 1}; keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def flatten_mapping(self, node):
        """<<'s pairs, the first of each key kept: PyYAML keeps the first only when the two keys
        are the same string object (one-letter keys are), so `<<: [{low: 1}, *b]` took *b's low."""
        own = [p for p in node.value if p[0].tag != MERGE_TAG]
        super().flatten_mapping(node)
        merged, seen = [], set()
        for k, v in node.value[:len(node.value) - len(own)]:
            key = (k.tag, k.value) if isinstance(k, yaml.ScalarNode) else id(k)
            if key not in seen:
                seen.add(key)
                merged.append((k, v))
        node.value = merged + node.value[len(node.value) - len(own):]  # then the mapping's own keys, which win

    def construct_yaml_int(self, node):
        _no_base_60(node)
        if re.fullmatch(r"[-+]?0[0-9_]+", node.value):
            digits = node.value.lstrip("+-").lstrip("0_") or "0"
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value} has a leading zero, which YAML reads as an octal number "
                f"({super().construct_yaml_int(node)}); write {node.value[0] if node.value[0] in '+-' else ''}"
                f"{digits}", node.start_mark)
        return super().construct_yaml_int(node)


    def construct_yaml_float(self, node):
        _no_base_60(node)
        return super().construct_yaml_float(node)


def _no_base_60(node):
    """YAML 1.1 reads 6:40 as a base-60 number (400), where a person meant text or a time."""
    if ":" in node.value:
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.value} is a base-60 number in YAML 1.1 (= {_sexagesimal(node.value)}); write the number itself, or quote it as text", node.start_mark)


def _sexagesimal(text: str):
    sign, parts = (-1 if text.startswith("-") else 1), text.lstrip("+-").replace("_", "").split(":")
    value = 0
    for p in parts:
        value = value * 60 + (float(p) if "." in p else int(p))
    return sign * value


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)
UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", UniqueKeyLoader.construct_yaml_float)


MAX_VALUES = 100_000  # far beyond any real spec or config


def load(text: str):
    """Parse YAML text; a duplicate key raises yaml.YAMLError naming both lines. Aliases
    repeated inside aliases (a "billion laughs" document of a few hundred bytes) are
    refused: every message or dump that writes the value out would never end."""
    data = yaml.load(text, Loader=UniqueKeyLoader)
    stack, count = [data], 0
    while stack:  # the values as written out, aliases expanded, up to MAX_VALUES
        count += 1
        if count > MAX_VALUES:
            raise yaml.YAMLError(f"more than {MAX_VALUES:,} values once its aliases (*name) are expanded; "
                                 "an alias of an alias of ... is not a spec")
        x = stack.pop()
        stack.extend(x.values() if isinstance(x, dict) else x if isinstance(x, list) else ())
    return data


def one_line(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem
