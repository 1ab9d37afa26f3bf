"""Cooperative stopping: a process-wide flag that Ctrl-C, SIGTERM or an orchestrator's cancellation sets, and that
every long loop (fine-tuning steps, statistics and evaluation batches, merge passes, optimisations) checks between
steps with `check()`. A stop therefore lands between two steps, never in the middle of a write, and the atomic
publish of every stored object keeps half-written results out of the store."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_flag = threading.Event()
_reason = ""
_scope: str | None = None  # the run a remote stop was meant for (a long-lived Dask worker serves many runs)
_listeners: list[Callable[[str], None]] = []  # told once per stop, in a thread of their own
_app_handlers = False  # True while `stop_on_signals` owns SIGINT/SIGTERM (a command-line run)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """Raised between two steps of long work once a stop was requested (not an error of the run)."""


def request_stop(reason: str, scope: str | None = None) -> None:
    """Ask every loop of this process to stop at its next step, and tell the listeners (the task runner's
    workers in other processes). `scope`: the run the stop is for, where a process outlives runs."""
    global _reason, _scope
    if _flag.is_set():
        return
    _reason, _scope = reason, scope
    _flag.set()
    for listener in list(_listeners):
        threading.Thread(target=listener, args=(reason,), name="mergeflow-stop-listener", daemon=True).start()


@contextmanager
def listening(listener: Callable[[str], None]) -> Iterator[None]:
    """While inside, a stop also calls `listener(reason)` (once, in its own thread: it may block)."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def enter_scope(scope: str) -> None:
    """At the start of work for run `scope`: forget a stop that was meant for another run."""
    if _flag.is_set() and _scope is not None and _scope != scope:
        reset()


def stop_requested() -> bool:
    return _flag.is_set()


def reason() -> str:
    return _reason


def check() -> None:
    """Raise `Stopped` when a stop was requested; call it between steps of any long loop."""
    if _flag.is_set():
        raise Stopped(f"stopped: {_reason}")


def reset() -> None:
    """Clear the flag (a new run in the same process, or a test)."""
    global _reason, _scope
    _flag.clear()
    _reason, _scope = "", None


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _handler(signum: int, _frame: object) -> None:
    name = _signal_name(signum)
    if _flag.is_set():  # a second signal: stop at once, without waiting for the current step
        print(f"\nmergeflow: {name} again: stopping at once", file=sys.stderr, flush=True)
        raise KeyboardInterrupt(name)
    request_stop(f"{name} received")
    print(f"\nmergeflow: {name} received: stopping after the current step (send it again to stop at once)",
          file=sys.stderr, flush=True)


def install_handlers() -> None:
    """Turn SIGINT and SIGTERM into a stop request (main thread only; a no-op elsewhere)."""
    global _app_handlers
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)
    _app_handlers = True


def reinstall_handlers() -> None:
    """Put the stop handlers back where an engine replaced them for a while (Prefect swaps in its own SIGTERM
    handler around a flow run); only when this process's command owns the signals, never under a Prefect runner,
    whose cancellation protocol needs Prefect's handler."""
    if _app_handlers and threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _handler)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: the first SIGINT/SIGTERM asks for a stop after the current step, a second one interrupts."""
    global _app_handlers
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    reset()
    install_handlers()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _app_handlers = False


WORKER_STOP_SIGNAL = signal.SIGUSR1  # what a command sends its process-pool workers to stop them after a step


def install_in_worker() -> None:
    """In a worker process of a process-pool task runner (main thread; idempotent): WORKER_STOP_SIGNAL asks for a
    stop after the current step, and Ctrl-C's SIGINT, which a terminal sends the whole process group, is left to
    the command (it forwards a stop). SIGTERM keeps its meaning: a worker whose group is terminated ends."""
    import multiprocessing

    if multiprocessing.parent_process() is None or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(WORKER_STOP_SIGNAL) is not _worker_handler:
        signal.signal(WORKER_STOP_SIGNAL, _worker_handler)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_handler(_signum: int, _frame: object) -> None:
    request_stop("the run is stopping")
