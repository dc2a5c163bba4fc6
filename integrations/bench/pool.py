"""The benchmark's training runs spread over worker processes (``bogc bench --jobs``).

Every run seeds its own initialisation and batch order (:func:`.protocol.train_run`)
and each worker keeps torch at ``--threads`` intra-op threads, so a run gives the
same numbers in any worker and for any ``--jobs``; only the wall-clock time changes.
``jobs == 1`` runs everything in this process, in order.

Workers are started with ``spawn`` (a fork of a process that has used torch's
thread pools can deadlock) and import torch once each.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

__all__ = ["Pool", "search_task", "train_task", "tune_task"]


def _init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def tune_task(split, name: str, cfg, tune_seeds: list[int]) -> dict[str, Any]:
    """:func:`.protocol.tune_lr` of the registered method ``name`` (a worker's task)."""
    from .methods import registry
    from .protocol import tune_lr

    return tune_lr(split, registry.build(name), cfg, tune_seeds, registry.lr_at,
                   registry.LR_BASE, registry.LR_EXTENSIONS)


def train_task(split, name: str, params: dict[str, Any], seed: int, cfg) -> dict[str, Any]:
    """One evaluation run (:func:`.protocol.train_run`) of ``name`` with ``params``."""
    from .methods import registry
    from .protocol import train_run

    return train_run(split, registry.build(name).with_params(**params), seed, cfg)


def search_task(split, name: str, cfg, lr: float, tune_seeds: list[int]) -> dict[str, Any]:
    """One variant of the pre-registered search (:func:`.protocol.tune`) at ``lr``."""
    from .methods import registry
    from .protocol import tune

    return tune(split, registry.build(name), cfg, {"lr": [lr]}, tune_seeds)


class Pool:
    """``jobs`` worker processes (none for ``jobs == 1``), each at ``threads`` torch threads."""

    def __init__(self, jobs: int, threads: int):
        self.jobs, self.threads = jobs, threads
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> Pool:
        if self.jobs > 1:
            self._executor = ProcessPoolExecutor(
                self.jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init, initargs=(self.threads,))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            # on an error or Ctrl-C, drop the queued runs instead of finishing them
            self._executor.shutdown(wait=exc[0] is None, cancel_futures=True)
            self._executor = None

    def run(self, tasks: Iterable[tuple[Any, Callable[..., Any], tuple]]) -> Iterator[tuple[Any, Any]]:
        """``(key, fn(*args))`` for each ``(key, fn, args)``, as each finishes.

        Tasks are handed out in the order given (put the longest first); the first
        error is raised once it arrives and cancels the runs not yet started.
        """
        if self._executor is None:
            for key, fn, args in tasks:
                yield key, fn(*args)
            return
        pending: dict[Future, Any] = {self._executor.submit(fn, *args): key
                                      for key, fn, args in tasks}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    key = pending.pop(fut)
                    yield key, fut.result()
        finally:
            for fut in pending:
                fut.cancel()
