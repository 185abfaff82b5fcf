"""Work spread over worker processes, in order and bounded: ``ordered_map`` (``data.num_proc``'s tokenization).

Workers are started with the ``spawn`` method, never ``fork``. The process that tokenizes is rarely single-threaded:
a fast tokenizer encodes a batch on a Rust thread pool (rayon), torch keeps its OpenMP pool, ``mrpo train`` has set
up accelerate (and on a GPU, CUDA) before it tokenizes, and logging handlers hold locks. A forked child inherits
those locks and pools as they were at the fork, held by threads that do not exist in it: tokenizers disables its
own parallelism in such a child (with a warning) to avoid a deadlock, CUDA does not work there at all, and Python
3.12 warns at every fork of a threaded process. A spawned worker is a fresh interpreter that imports what it needs
and unpickles the state it is given, the same on Linux and macOS; that costs a second or two per worker, once per
tokenization, paid in parallel. ``forkserver`` would be as safe, at the price of a process-wide server whose
preloads are global state shared with anything else in the process that uses it.

As with any spawned process, Python imports the main script again in each worker: a script that sets
``data.num_proc`` needs the ``if __name__ == "__main__":`` guard (the ``mrpo`` command has it).
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import pickle
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

IN_FLIGHT_PER_WORKER = 2
"""Items submitted ahead per worker: one being worked on, one waiting, so no worker idles while the main process
takes a result; memory holds at most ``2 x num_proc`` items and results, however long the input."""

_STATE: Any = None
"""A worker's state, unpickled once by ``_start_worker``."""


def ordered_map(
    function: Callable[[Any, Item], Result],
    state: Any,
    items: Iterable[Item],
    *,
    num_proc: int | None,
) -> Iterator[Result]:
    """``function(state, item)`` for each item, in the items' order.

    ``num_proc`` None or 1: in this process, one item at a time. More: in that many spawned worker processes, each
    given ``state`` once (pickled); ``function`` must be a module-level function (workers import it by name). The
    items are read as results are taken, at most ``IN_FLIGHT_PER_WORKER x num_proc`` ahead, so a stream stays a
    stream. The first exception a worker raises is raised here, in order; leaving early (an exception, a generator
    closed) cancels what is queued and waits for the items being worked on.
    """
    if num_proc is None or num_proc <= 1:
        for item in items:
            yield function(state, item)
        return
    payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    executor = ProcessPoolExecutor(
        max_workers=num_proc,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(payload,),
    )
    pending: deque[Future] = deque()
    try:
        iterator = iter(items)
        for item in iterator:
            pending.append(executor.submit(_run, function, item))
            if len(pending) >= IN_FLIGHT_PER_WORKER * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _start_worker(payload: bytes) -> None:
    global _STATE
    # The processes are the parallelism: one tokenizer thread each (set before the tokenizers are unpickled and
    # first used), rather than a thread pool the size of the machine in every worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C reaches every process of the terminal's group: the main process stops the work and the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _STATE = pickle.loads(payload)


def _run(function: Callable[[Any, Item], Result], item: Item) -> Result:
    result = function(_STATE, item)
    return_freed_memory()
    return result


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def return_freed_memory() -> None:
    """Hand the memory freed by a block back to the system (glibc's ``malloc_trim``).

    A fast tokenizer encodes a batch on several threads, and glibc gives each thread its own heap; the blocks freed
    there stay in the process, fragmented, so a stream of a million pairs crept up by ~35 MB per 100k pairs
    (measured on this project's scale benchmark). Trimming after each block keeps the streamed tokenization flat.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
