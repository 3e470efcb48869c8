"""Reading YAML someone else wrote, with limits: the one loader behind every manifest the CLI reads.

`yaml.safe_load` constructs no Python objects beyond the plain ones, but it has no limits: an
alias bomb ("billion laughs": nine aliases to nine aliases to ...) expands to billions of nodes,
a document nested 200,000 deep overflows the recursive composer, and a recursive alias
(`&a [*a]`) builds a cycle every later walk loops on. Here the file is read with a size cap and
decoded as strict UTF-8, composed into PyYAML's node graph (where an alias is one shared node,
not a copy) with the nesting depth bounded while composing, and the graph is measured BEFORE any
Python object is constructed: aliases counted, cycles refused, the fully expanded node count and
depth computed over the shared nodes in linear time. Only then are the documents constructed.

Every refusal is a `ManifestError` (a ValueError) with one line that names the file.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_BYTES = 1 << 20  # 1 MiB per file: a manifest is a few KiB
MAX_DEPTH = 100  # nesting of mappings and sequences, aliases expanded
MAX_ALIASES = 100  # `*name` references in one file
MAX_NODES = 100_000  # scalars, mappings and sequences of one document, aliases expanded
MAX_DOCUMENTS = 100


class ManifestError(ValueError):
    """The file cannot be read as a manifest; the message is one line for the user."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases and refuses deep nesting while it composes (the composer
    recurses once per level, so the bound keeps it far from Python's recursion limit)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise ManifestError(f"more than {MAX_ALIASES} aliases (*name); write the values out")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise ManifestError(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def read_text(path: Path, limit: int = MAX_BYTES) -> str:
    """The file's text: at most `limit` bytes of UTF-8 (a byte-order mark is allowed)."""
    with open(path, "rb") as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise ManifestError(f"larger than {limit // 1024} KiB; a manifest is a few KiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ManifestError(f"not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start})") from None


def load_all(text: str) -> list[Any]:
    """The documents of a YAML stream, each measured before it is constructed; empty documents
    (`---` alone, comments only) are left out."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ManifestError(f"larger than {MAX_BYTES // 1024} KiB; a manifest is a few KiB")
    documents: list[Any] = []
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # the reader refuses unprintable characters right here
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            if len(documents) >= MAX_DOCUMENTS:
                raise ManifestError(f"more than {MAX_DOCUMENTS} documents in one file")
            measure(node)
            document = loader.construct_document(node)
            if document is not None:
                documents.append(document)
    except ManifestError:
        raise
    except yaml.YAMLError as error:
        raise ManifestError(f"not valid YAML: {_one_line(error)}") from None
    except (ValueError, TypeError, OverflowError) as error:
        # A timestamp that is no date (2026-02-31), a key that cannot be a key: still the input's fault.
        raise ManifestError(f"not valid YAML: {_one_line(error)}") from None
    except RecursionError:
        raise ManifestError(f"nested deeper than {MAX_DEPTH} levels") from None
    finally:
        if loader is not None:
            loader.dispose()
    return documents


def load_path(path: Path) -> list[Any]:
    """`load_all` of a file; a ManifestError names the file."""
    try:
        return load_all(read_text(path))
    except ManifestError as error:
        raise ManifestError(f"{path}: {error}") from None


def measure(root: Node) -> None:
    """Refuse a node graph whose expansion (every alias replaced by a copy of its anchor) has a
    cycle, more than MAX_NODES nodes or more than MAX_DEPTH levels. Each shared node is measured
    once, so a bomb is refused in time proportional to its text, not to its expansion."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)
    in_progress: set[int] = set()
    # Iterative post-order walk: (node, children visited?)
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, visited = stack.pop()
        key = id(node)
        if visited:
            count, depth = 1, 1
            for child in _children(node):
                child_count, child_depth = sizes[id(child)]
                count += child_count
                depth = max(depth, child_depth + 1)
            if count > MAX_NODES:
                raise ManifestError(f"expands to more than {MAX_NODES} values (aliases of aliases?); write it out")
            if depth > MAX_DEPTH:
                raise ManifestError(f"nested deeper than {MAX_DEPTH} levels (aliases expanded)")
            sizes[key] = (count, depth)
            in_progress.discard(key)
            continue
        if key in sizes:
            continue
        if key in in_progress:
            raise ManifestError("an alias refers to a node that contains it (a cycle)")
        in_progress.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in in_progress:
                raise ManifestError("an alias refers to a node that contains it (a cycle)")
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: Node) -> Iterator[Node]:
    if isinstance(node, SequenceNode):
        yield from node.value
    elif isinstance(node, MappingNode):
        for key, value in node.value:
            yield key
            yield value


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]
