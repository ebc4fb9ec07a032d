"""Reading a YAML manifest: its data, and the line each key was written on, so that every
problem can say where it is. Nothing here knows what the keys mean (loader.py does)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..constants import ALIAS_EXPANSION_RATIO, ALIAS_FREE_NODES


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader that keeps dates as text: a prompt or seed written 2024-05-01 stays a string
    (a date object could not be sent as JSON). LibYAML's parser when PyYAML has it: a manifest
    with long lists parses ten times faster."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class YamlUnreadable(Exception):
    """The file gives no document to work with; ``problem`` says why and where."""

    def __init__(self, location: str, message: str):
        super().__init__(message)
        self.location, self.message = location, message


@dataclass
class YamlDoc:
    """A YAML document that is a mapping: its data, each top-level key's line, and its nodes (for
    the lines of what is inside them). ``duplicates``: (line, key, message) of keys written twice
    in any mapping read so far, which PyYAML would silently keep the last of."""

    data: dict[str, Any]
    lines: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, yaml.Node] = field(default_factory=dict)
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)

    def key_lines(self, key: str) -> dict[str, int]:
        """The line of each key of the mapping under top-level ``key`` ({} if it is none)."""
        node = self.nodes.get(key)
        if not isinstance(node, yaml.MappingNode):
            return {}
        self.check_duplicates(node)
        return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}

    def item_lines(self, key: str) -> list[tuple[int, bool]]:
        """(line, is a mapping) of each item of the list under top-level ``key``; a mapping's
        duplicate keys are noted."""
        node = self.nodes.get(key)
        if not isinstance(node, yaml.SequenceNode):
            return []
        out = []
        for item in node.value:
            if isinstance(item, yaml.MappingNode):
                self.check_duplicates(item)
            out.append((item.start_mark.line + 1, isinstance(item, yaml.MappingNode)))
        return out

    def check_duplicates(self, node: yaml.MappingNode) -> None:
        seen: dict[str, int] = {}
        for k, _ in node.value:
            name, line = str(k.value), k.start_mark.line + 1
            if name in seen:
                self.duplicates.append((f"line {line}", name, f"appears twice (also on line {seen[name]}); keep one"))
            seen[name] = line


def read_yaml(path: Path, top_keys: tuple[str, ...]) -> YamlDoc:
    """The document of a YAML manifest; raises ``YamlUnreadable`` when there is none to use."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlUnreadable("", "file not found") from None
    except UnicodeDecodeError:
        raise YamlUnreadable("", "not UTF-8 text") from None
    except OSError as exc:
        raise YamlUnreadable("", f"cannot read: {exc.strerror or exc}") from None
    root, data = _parse(text)
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode | type(None)):
        raise YamlUnreadable("", "the manifest must be a mapping of keys (" + ", ".join(top_keys) + ")")
    doc = YamlDoc({str(k): v for k, v in data.items()})
    if isinstance(root, yaml.MappingNode):
        doc.check_duplicates(root)
        for k, v in root.value:
            doc.lines[str(k.value)] = k.start_mark.line + 1
            doc.nodes[str(k.value)] = v
    return doc


def _parse(text: str) -> tuple[yaml.Node | None, Any]:
    """(root node, data) of one YAML document."""
    try:
        loader = _Loader(text)  # checks for unprintable characters already
        try:
            root = loader.get_single_node()
            # Aliases are checked before any value is built: PyYAML shares an aliased value
            # rather than copying it, but every later walk (checks, job keys) would not.
            bomb = _alias_bomb(root) if root is not None and "&" in text and "*" in text else None
            if bomb is not None:
                raise YamlUnreadable(*bomb)
            return root, loader.construct_document(root) if root is not None else {}
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        if isinstance(exc, yaml.reader.ReaderError):
            where = f"line {text.count(chr(10), 0, exc.position) + 1}"
        raise YamlUnreadable(where, "not valid YAML: "
                             f"{getattr(exc, 'problem', None) or getattr(exc, 'reason', exc)}") from None


def _alias_bomb(root: yaml.Node) -> tuple[str, str] | None:
    """(location, message) when YAML aliases expand the document beyond what its written size
    justifies (a "billion laughs": nine lines asking for 387 million values).

    Counts each node's size with its aliases expanded, each distinct node once (sizes are
    remembered), so it costs the nodes written, not the nodes meant. A node that contains itself
    counts once here; building its value reports it."""
    sizes: dict[int, int] = {}
    nodes: dict[int, yaml.Node] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        kids = _children(node)
        if children_done:
            sizes[key] = 1 + sum(sizes.get(id(k), 1) for k in kids)
            continue
        if key in nodes:
            continue
        nodes[key] = node
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in nodes)
    expanded = sizes[id(root)]
    limit = max(ALIAS_FREE_NODES, ALIAS_EXPANSION_RATIO * len(nodes))
    if expanded <= limit:
        return None
    # Point at the smallest value over the limit: where the aliases cross it.
    size, node = min(((sizes[k], n) for k, n in nodes.items() if sizes[k] > limit), key=lambda sn: sn[0])
    return (f"line {node.start_mark.line + 1}",
            f"YAML aliases (*name) expand the file to {expanded:,} values from {len(nodes):,} written "
            f"(this one alone to {size:,}); at most {limit:,} are allowed: write the values out, or use "
            "defaults, matrix or repeat")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []

