"""Config files: YAML read strictly (duplicate keys refused, 1e-3 is a number, no alias
bombs) and `extends: other.yaml` chains deep-merged, each key remembering its file.

Every mistake is a one-line `UsageError` naming the file; `config.py` validates the result.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from cifar_bp.errors import UsageError

Origins = list[tuple[tuple, str]]  # (key path, where it came from); later entries win


# PyYAML reads YAML 1.1, where 1e-3 is a string (only 1.0e-3 is a number); YAML 1.2 and
# every user read it as a number, and so does this loader.
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_MAX_NODES, _MAX_DEPTH = 100_000, 32  # aliases can expand a small file into billions of nodes


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))


def _check_node(node: yaml.Node, where: str, path: tuple, budget: list[int]) -> None:
    """Refuse duplicate keys (YAML would keep the last one silently) and alias bombs."""
    budget[0] -= 1
    if budget[0] < 0:
        raise UsageError(f"{where}: more than {_MAX_NODES} values (aliases that expand?)")
    if len(path) > _MAX_DEPTH:
        raise UsageError(f"{where}: nested more than {_MAX_DEPTH} levels deep")
    if isinstance(node, yaml.MappingNode):
        marks: dict[str, str] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            mark = key_node.start_mark
            at = f"line {mark.line + 1}, column {mark.column + 1}"
            if key_node.tag != "tag:yaml.org,2002:merge" and key in marks:
                raise UsageError(
                    f"{where}: {dotted((*path, key))}: a key may appear once "
                    f"(given at {marks[key]} and again at {at})"
                )
            marks[key] = at
            _check_node(value_node, where, (*path, key), budget)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_node(item, where, (*path, index), budget)


def parse_yaml(text: str, where: str, key: tuple = ()) -> Any:
    """YAML text (the value of `key`, for a --set) to Python values, or a one-line
    UsageError that names `where`."""
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node(node, where, key, [_MAX_NODES])
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise UsageError(f"{where}: malformed YAML at {at}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"{where}: malformed YAML: {_one_line(err)}") from None
    except RecursionError:
        raise UsageError(f"{where}: nested too deeply to be a config") from None
    except ValueError as err:  # e.g. a NUL in the text of a --set
        raise UsageError(f"{where}: malformed YAML: {_one_line(err)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_file(path: Path) -> dict[str, Any]:
    """One file's top-level mapping, without following `extends`."""
    if not path.is_file():
        raise UsageError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot be read ({err.strerror or err})") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of sections (data, model, ...) at the top")
    return data


def load_tree(path: Path, origins: Origins, chain: list[Path] | None = None) -> dict[str, Any]:
    """The file deep-merged over the file it `extends` (resolved relative to it), recursively."""
    data = read_file(path)
    parent = data.pop("extends", None)
    tree: dict[str, Any] = {}
    if parent is not None:
        if not isinstance(parent, str) or not parent.strip():
            raise UsageError(
                f"{path}: extends: must be the path of another config file, relative to "
                f"this one (got {shown(parent)})"
            )
        target = path.parent / Path(parent).expanduser()
        here = [*(chain or []), path.resolve()]
        if target.resolve() in here:
            loop = " -> ".join(p.name for p in [*here, target.resolve()])
            raise UsageError(f"{path}: extends: {parent}: a cycle ({loop})")
        if not target.is_file():
            raise UsageError(f"{path}: extends: {parent}: config file not found at {target}")
        tree = load_tree(target, origins, here)
    _record(data, (), str(path), origins)
    return _merge(tree, data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _record(data: dict[str, Any], path: tuple, where: str, origins: Origins) -> None:
    # Leaves only: a file that sets one optim key must not be blamed for another one.
    for key, value in data.items():
        if isinstance(value, dict) and value:
            _record(value, (*path, key), where, origins)
        else:
            origins.append(((*path, key), where))


def dotted(loc: tuple) -> str:
    """('optim', 'betas', 1) -> 'optim.betas[1]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def shown(value: Any) -> str:
    """A value for an error line: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
