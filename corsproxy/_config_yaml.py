"""Reading the config text as YAML, keeping what the validation errors lack:
the position of every key and list item (so messages come out in file order), the
keys written twice in one mapping (an error: YAML would silently keep the last
one), and syntax errors as one ``FILE: line L, column C: ...`` line.

This module imports neither pydantic nor :mod:`corsproxy.config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

Loc = tuple[Any, ...]


class _YamlError(Exception):
    """The text is not readable YAML; ``line`` is the finished message
    (``FILE: line L, column C: YAML syntax error: ...; how to fix it``)."""

    def __init__(self, line: str) -> None:
        self.line = line
        super().__init__(line)


@dataclass
class _Document:
    """A parsed YAML file: the data, where each key and item is (for sorting the
    messages in file order), and the duplicate keys found."""

    data: Any
    positions: dict[Loc, tuple[int, int]]
    duplicates: list[tuple[Loc, str]]


def _yaml_error(source: str, e: yaml.YAMLError, text: str) -> str:
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        return (
            f"{source}: line {line}, column {column}: YAML syntax error: character "
            f"U+{e.character:04X} is not allowed in YAML; remove it"
        )
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
    context = getattr(e, "context", None)
    context_mark = getattr(e, "context_mark", None)
    extra = ""
    if context and context_mark is not None:
        extra = f" ({context} at line {context_mark.line + 1})"
    elif context:
        extra = f" ({context})"
    fix = "fix the YAML syntax there"
    if "\\t" in problem or "\t" in problem:
        fix = "indent with spaces, not tabs"
    elif "expected a single document" in problem:
        fix = "keep a single document in the file (remove the extra ---)"
    return f"{source}: {where}: YAML syntax error: {problem}{extra}; {fix}"


def _walk(node: yaml.Node, loc: Loc, doc: _Document) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            here = (*loc, key_node.value)
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                doc.duplicates.append(
                    (
                        here,
                        f"written twice (lines {seen[key_node.value]} and {line}); YAML keeps "
                        f"only the last one, so remove one or merge them",
                    )
                )
            else:
                seen[key_node.value] = line
                doc.positions[here] = (key_node.start_mark.line, key_node.start_mark.column)
            _walk(value_node, here, doc)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            doc.positions[(*loc, i)] = (item.start_mark.line, item.start_mark.column)
            _walk(item, (*loc, i), doc)


def _read_yaml(text: str, source: str) -> _Document:
    """Parse ``text``; a syntax error raises :class:`_YamlError` at once (nothing
    else can be checked then; :func:`corsproxy.config.parse_config` reports it as
    the only :class:`~corsproxy.config.ConfigError` line)."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        doc = _Document(None, {}, [])
        if node is not None:
            _walk(node, (), doc)
            doc.data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise _YamlError(_yaml_error(source, e, text)) from None
    except RecursionError:
        raise _YamlError(f"{source}: YAML: the document is nested too deeply; flatten it") from None
    finally:
        if loader is not None:
            loader.dispose()
    return doc
