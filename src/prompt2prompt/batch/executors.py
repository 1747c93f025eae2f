"""Executors: the same `Worker` in this process, in a process pool, or as Ray actors.

Each takes groups of jobs with `submit`, hands back finished groups with `wait` (a group's outcomes, or the
exception that killed its worker), and says with `capacity` how many groups it takes at once. Ray is
imported only by `RayExecutor`: it is an optional extra.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import ctypes
import dataclasses
import multiprocessing
import signal
import sys
from typing import Any

import torch

from .manifest import Job
from .worker import Outcome, Worker, WorkerConfig

__all__ = ["InlineExecutor", "PoolExecutor", "RayExecutor", "start_executor"]


class InlineExecutor:
    """The worker in this process: one group at a time, run when it is waited for."""

    def __init__(self, config: WorkerConfig):
        self.worker = Worker(config)
        self.queue: list[list[Job]] = []
        self.capacity = 1

    def submit(self, group: list[Job]) -> None:
        self.queue.append(group)

    def wait(self) -> list[tuple[list[Job], list[Outcome] | BaseException]]:
        group = self.queue.pop(0)
        return [(group, self.worker.run(group))]

    def close(self) -> None:
        self.queue.clear()


_POOL_WORKER: Worker | None = None


def _kill_with_parent() -> None:
    """Make this process die with the process that started it, so that `kill -9` of a run leaves no orphans."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker without its warning about leaked semaphores.

    After a `kill -9` of a run, the tracker (a process of its own) removes the pool's semaphores, as it should,
    and warns "There appear to be N leaked semaphore objects to clean up at shutdown", which reads like damage
    though nothing was lost. The tracker takes its warning filters from this process's `-W` options when it
    starts; a tracker already running keeps its own.
    """
    from multiprocessing import resource_tracker

    option = "ignore:resource_tracker:UserWarning"
    sys.warnoptions.append(option)
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(option)


def _pool_init(config: WorkerConfig, counter) -> None:
    global _POOL_WORKER
    _kill_with_parent()
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    device = config.device
    if device in (None, "cuda"):
        if torch.cuda.is_available():
            device = f"cuda:{index % torch.cuda.device_count()}"  # one replica per GPU, round robin
    _POOL_WORKER = Worker(dataclasses.replace(config, device=device))


def _pool_run(group: list[Job]) -> list[Outcome]:
    return _POOL_WORKER.run(group)


class PoolExecutor:
    """`workers` spawned processes, each with one model replica (one per GPU, round robin, on CUDA)."""

    def __init__(self, config: WorkerConfig, workers: int):
        self.config, self.workers = config, workers
        self.capacity = 2 * workers  # one group running and one waiting per process
        self.pending: dict[futures.Future, list[Job]] = {}
        self._start()

    def _start(self) -> None:
        _quiet_resource_tracker()
        context = multiprocessing.get_context("spawn")  # fork would copy this process's threads and CUDA state
        self.pool = futures.ProcessPoolExecutor(self.workers, mp_context=context, initializer=_pool_init,
                                                initargs=(self.config, context.Value("i", 0)))

    def submit(self, group: list[Job]) -> None:
        self.pending[self.pool.submit(_pool_run, group)] = group

    def wait(self) -> list[tuple[list[Job], list[Outcome] | BaseException]]:
        done, _ = futures.wait(self.pending, return_when=futures.FIRST_COMPLETED)
        results = []
        broken = False
        for future in done:
            group = self.pending.pop(future)
            error = future.exception()
            broken |= isinstance(error, futures.process.BrokenProcessPool)
            results.append((group, error if error is not None else future.result()))
        if broken:  # a worker died (killed, segfault): its pool is unusable, the run goes on with a new one
            for group in self.pending.values():
                results.append((group, futures.process.BrokenProcessPool("a worker process of the pool died")))
            self.pending.clear()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._start()
        return results

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """One actor per GPU of the cluster (or `workers` CPU actors without GPUs), each holding a model replica."""

    def __init__(self, config: WorkerConfig, workers: int | None, address: str):
        try:
            import ray
        except ImportError as error:
            raise RuntimeError(f"--ray needs the 'batch' extra ({error}): pip install 'prompt2prompt[batch]'") from None
        self.owned = not ray.is_initialized()
        if self.owned:
            ray.init(address=address, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or gpus or 1
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        actor = ray.remote(**resources, max_restarts=-1)(Worker)
        self.ray = ray
        self.actors = [actor.remote(dataclasses.replace(config, device=None if gpus else config.device))
                       for _ in range(count)]
        self.idle = list(self.actors)
        self.capacity = len(self.actors)
        self.pending: dict[Any, tuple[Any, list[Job]]] = {}

    def submit(self, group: list[Job]) -> None:
        actor = self.idle.pop()
        self.pending[actor.run.remote(group)] = (actor, group)

    def wait(self) -> list[tuple[list[Job], list[Outcome] | BaseException]]:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        results = []
        for ref in ready:
            actor, group = self.pending.pop(ref)
            self.idle.append(actor)
            try:
                results.append((group, self.ray.get(ref)))
            except Exception as error:  # the actor died; Ray restarts it for the next group
                results.append((group, error))
        return results

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.owned:
            self.ray.shutdown()


def start_executor(config: WorkerConfig, *, workers: int | None, ray_address: str | None):
    """Ray actors with `ray_address`, else this process with `workers=0`, else a pool of `workers` processes."""
    if ray_address is not None:
        return RayExecutor(config, workers, ray_address)
    return InlineExecutor(config) if workers == 0 else PoolExecutor(config, workers)
