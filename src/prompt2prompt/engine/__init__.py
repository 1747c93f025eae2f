"""The engine: the `Editor` (prepare, run, cache_source), the run's data, its checks, its sending, its step callback
and its source caches."""

from .cache import SourceCache, SourceStore
from .editor import Editor, load_editor
from .run import EditResult, PreparedRun

__all__ = ["EditResult", "Editor", "PreparedRun", "SourceCache", "SourceStore", "load_editor"]
