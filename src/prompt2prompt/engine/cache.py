"""A source branch recorded once, so that later edits of the same source run only their own rows.

Every edit reads four things from its source: the source's conditional queries and keys in the layers it
edits (every cross-attention layer, and the self-attention layers at the self-replacement resolutions), the
source's recorded cross-attention maps (local blending, attention maps), the source's latents after every
step (local blending), and the source's image. `Editor.cache_source` records them in one source-only run;
`Editor.prepare(..., cache=...)` then leaves the source's rows out of the batch and reads them from here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)  # tensors have no truth value: compare fields yourself
class SourceCache:
    """A recorded source branch: pass it to `Editor.prepare(..., cache=...)` or `Editor.edit(..., cache=...)`.

    It is tied to its pipeline and to every setting that shapes the source (`settings`); a run that differs
    in any of them is refused. It may live on another device than the run (e.g. on the CPU while the run is
    on a GPU): each evaluation's tensors are moved to the run's device as the run reaches it.
    """

    prompt: str
    settings: dict[str, Any]  # what a run must share with the source: steps, guidance, size, scheduler, ...
    pipeline_id: int  # id() of the pipeline that made it
    latents: torch.Tensor  # x_T: (1, C, h, w)
    evaluations: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]  # per UNet evaluation: layer -> (q, k)
    step_latents: torch.Tensor  # the source's latents after each step: (N, 1, C, h, w)
    image: torch.Tensor  # the decoded source in [0, 1]: (1, 3, H, W)
    blend_maps: torch.Tensor | None = None  # per evaluation, the blend layers' maps summed so far: (K, h, w, L)
    records: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # size -> summed maps (1, h, w, L)
    record_counts: dict[tuple[int, int], int] = field(default_factory=dict)
    inversion: Any = None  # the Inversion the source was made from, if any

    @property
    def nbytes(self) -> int:
        """The memory the cache holds, in bytes."""
        tensors = [self.latents, self.step_latents, self.image, *self.records.values()]
        if self.blend_maps is not None:
            tensors.append(self.blend_maps)
        tensors += [t for evaluation in self.evaluations for pair in evaluation.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def device(self) -> torch.device:
        return self.step_latents.device

    def evaluation(self, index: int, device: torch.device | str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The source's (query, key) per layer at UNet evaluation `index`, on `device`."""
        return {name: (q.to(device, non_blocking=True), k.to(device, non_blocking=True))
                for name, (q, k) in self.evaluations[index].items()}

    def check(self, settings: dict[str, Any], pipeline_id: int) -> None:
        """Raise a ValueError naming every setting in which a run differs from this cache."""
        if pipeline_id != self.pipeline_id:
            raise ValueError("this source cache was made with another pipeline; make one with this editor's "
                             "cache_source()")
        differ = [f"{key}={settings.get(key)!r} (the cache has {value!r})"
                  for key, value in self.settings.items() if settings.get(key) != value]
        if differ:
            raise ValueError(f"this run differs from the cached source in {', '.join(differ)}; use the cache's "
                             "settings (leave them unset) or cache the source again")


class CacheRecorder:
    """Collects what a source-only run shows the engine, evaluation by evaluation, into a `SourceCache`."""

    def __init__(self, device: torch.device | str | None):
        self.device = device  # where the cache lives; None: where the run is
        self.evaluations: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{}]
        self.blend_maps: list[torch.Tensor] = []
        self.step_latents: list[torch.Tensor] = []

    def _keep(self, tensor: torch.Tensor, *, clone: bool = True) -> torch.Tensor:
        """`tensor` on the cache's device: a copy, unless it is already a private copy on that device."""
        device = torch.device(self.device) if self.device is not None else tensor.device
        if device != tensor.device:
            return tensor.detach().to(device)
        return tensor.detach().clone() if clone else tensor

    def __call__(self, name: str, query: torch.Tensor, key: torch.Tensor) -> None:
        """A layer's source query and key (1, heads, ., d) at the current evaluation, kept on the run's device."""
        # Moved to the cache's device once per evaluation (`end_evaluation`), not in every layer call.
        self.evaluations[-1][name] = (query.detach().clone(), key.detach().clone())

    def end_evaluation(self, blend_sum: torch.Tensor | None) -> None:
        if blend_sum is not None:
            self.blend_maps.append(self._keep(blend_sum[0]))
        self.evaluations[-1] = {name: (self._keep(q, clone=False), self._keep(k, clone=False))
                                for name, (q, k) in self.evaluations[-1].items()}
        self.evaluations.append({})

    def end_step(self, latents: torch.Tensor) -> None:
        self.step_latents.append(self._keep(latents))

    def finish(self, **fields: Any) -> SourceCache:
        """The cache; `fields` are the SourceCache fields the run itself knows (prompt, settings, image, ...)."""
        evaluations = self.evaluations[:-1]  # the last evaluation opened an empty one
        blend_maps = torch.stack(self.blend_maps) if self.blend_maps else None
        records = {size: self._keep(total) for size, total in fields.pop("records").items()}
        return SourceCache(evaluations=evaluations, step_latents=torch.stack(self.step_latents),
                           blend_maps=blend_maps, records=records, image=self._keep(fields.pop("image")), **fields)


class SourceStore:
    """Sources and inversions by key, within a memory budget, the least recently used evicted first.

    A front end that edits one source many times (the web app) keeps its `SourceCache`s and `Inversion`s
    here, so that changing only the edits re-runs only the edits. Thread-safe.
    """

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, not {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.items.values())

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value stored under `key`, or `make()`'s, stored (when it fits the budget) and returned."""
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                self.hits += 1
                return self.items[key][0]
            self.misses += 1
        value = make()
        size = nbytes(value)
        with self.lock:
            self.items[key] = (value, size)
            while self.items and self.nbytes > self.budget_bytes:
                self.items.popitem(last=False)
        return value


def nbytes(value: Any) -> int:
    """The bytes of the tensors a SourceCache, an Inversion or any dataclass of tensors holds."""
    if isinstance(value, SourceCache):
        return value.nbytes
    fields = vars(value).values() if hasattr(value, "__dict__") else ()
    return sum(t.numel() * t.element_size() for t in fields if isinstance(t, torch.Tensor))
