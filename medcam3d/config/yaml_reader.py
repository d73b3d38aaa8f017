"""The YAML of a config read safely: PyYAML's safe loader (no Python tags), at most
:data:`MAX_CONFIG_BYTES` bytes, :data:`MAX_CONFIG_NODES` nodes once anchors and aliases are expanded
(no "billion laughs") and :data:`~medcam3d.config.values.MAX_CONFIG_DEPTH` levels."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, short_repr
from .values import MAX_CONFIG_DEPTH

__all__ = ["read_yaml", "MAX_CONFIG_BYTES", "MAX_CONFIG_NODES"]

#: A config file larger than this is refused before it is parsed (configs are a few kB; PyYAML's
#: pure-Python parser reads about 50 kB a second).
MAX_CONFIG_BYTES = 128 * 1024
#: Most YAML nodes a config may hold once anchors/aliases are expanded ("billion laughs").
MAX_CONFIG_NODES = 100_000


def read_yaml(path: Path) -> object:
    """The YAML document in ``path`` (None for an empty one); :class:`~medcam3d.errors.ConfigError`, naming
    the file, for anything that is not a small plain YAML file."""
    import yaml

    hint = "give the path to a .yaml file, e.g. configs/demo.yaml"
    try:
        if not path.exists():
            raise ConfigError(f"Config file {str(path)!r} does not exist ({hint}).")
        if not path.is_file():
            raise ConfigError(f"Config path {str(path)!r} is not a regular file ({hint}).")
        with path.open("rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"Cannot read config file {str(path)!r}: {error.strerror or error} ({hint}).") from None
    if len(raw) > MAX_CONFIG_BYTES:
        message = (
            f"{path}: the config file is larger than {MAX_CONFIG_BYTES} bytes; a config is a few kB of YAML. "
            "Check that this is the config (not an image or weights file)."
        )
        raise ConfigError(message)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        message = (
            f"{path}: the config is not UTF-8 text (byte {error.start} cannot be decoded). Save it as UTF-8 "
            "(or check that this is the config, not a binary file)."
        )
        raise ConfigError(message) from None
    loader = None
    try:
        loader = _loader_class()(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, path)
        return loader.construct_document(node)
    except ConfigError as error:
        if str(error).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML (only plain YAML, no Python tags, is read): {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply (at most {MAX_CONFIG_DEPTH} levels).") from None
    except (ValueError, TypeError, OverflowError, MemoryError) as error:  # e.g. a 5000-digit int, a bad date
        raise ConfigError(f"{path}: a value in the YAML cannot be read: {short_repr(str(error))}") from None
    finally:
        if loader is not None:
            loader.dispose()


_LOADER = None


def _loader_class():
    """PyYAML's SafeLoader, stopping as soon as the document nests too deep or holds too many nodes."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class _BoundedSafeLoader(yaml.SafeLoader):
            _depth = 0
            _nodes = 0

            def compose_node(self, parent, index):
                self._depth += 1
                self._nodes += 1
                try:
                    if self._depth > MAX_CONFIG_DEPTH:
                        raise ConfigError(f"the YAML is nested more than {MAX_CONFIG_DEPTH} levels deep.")
                    if self._nodes > MAX_CONFIG_NODES:
                        raise ConfigError(f"the YAML holds more than {MAX_CONFIG_NODES} values; a config is small.")
                    return super().compose_node(parent, index)
                finally:
                    self._depth -= 1

        _LOADER = _BoundedSafeLoader
    return _LOADER


def _check_nodes(root: object, path: Path) -> None:
    """Refuse YAML whose node graph, with aliases expanded, is too large, too deep or recursive."""
    import yaml

    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    active: set[int] = set()

    def visit(node) -> None:  # depth-first; node graphs with aliases are DAGs (or cyclic)
        key = id(node)
        if key in sizes:
            return
        if key in active:
            raise ConfigError(f"{path}: an anchor is used inside itself (a recursive structure); a config cannot contain itself.")
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            sizes[key], depths[key] = 1, 0
            return
        active.add(key)
        for child in children:
            visit(child)
        active.discard(key)
        sizes[key] = 1 + sum(sizes[id(child)] for child in children)
        depths[key] = 1 + max((depths[id(child)] for child in children), default=0)
        if sizes[key] > MAX_CONFIG_NODES:
            message = (
                f"{path}: the YAML expands to more than {MAX_CONFIG_NODES} values (anchors and aliases are "
                "expanded); a config is small. Write the values out instead of nesting aliases."
            )
            raise ConfigError(message)
        if depths[key] > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{path}: the YAML is nested more than {MAX_CONFIG_DEPTH} levels deep.")

    visit(root)
