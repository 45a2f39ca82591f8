"""YAML as users write it: PyYAML's safe loader, but a key given twice is an error
(PyYAML silently keeps the last one, so `T: 4 ... T: 8` would lose the 4 unseen),
and so is an integer with a leading zero (YAML 1.1 reads `010` as octal 8).
Merge keys (`<<: *common`) work as YAML defines them: a key written in the mapping
overrides a merged one."""
from __future__ import annotations

import re

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # what << brings in may be overridden; SafeLoader flattens it
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

    def construct_yaml_int(self, node):
        if re.fullmatch(r"[-+]?0[0-9_]+", node.value):
            digits = node.value.lstrip("+-").lstrip("0_") or "0"
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value} has a leading zero, which YAML reads as an octal number "
                f"({super().construct_yaml_int(node)}); write {node.value[0] if node.value[0] in '+-' else ''}"
                f"{digits}", node.start_mark)
        return super().construct_yaml_int(node)


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)


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
