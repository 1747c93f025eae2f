"""The engine: the `Editor` (prepare, run, cache_source), its step callback and its source caches."""

from .cache import SourceCache, SourceStore
from .editor import Editor, EditResult, PreparedRun, load_editor

__all__ = ["EditResult", "Editor", "PreparedRun", "SourceCache", "SourceStore", "load_editor"]
