"""Reload the policy without a restart: on SIGHUP, and when a watched file changes.

What is watched: the config file and every ``allow_origins_file`` it names. A file
counts as changed when what ``os.stat`` sees through every symlink changes (device,
inode, size, modification time), polled every :data:`POLL_INTERVAL` seconds. That
also sees a Kubernetes ConfigMap update, which writes a new directory and swaps the
``..data`` symlink instead of writing the file.

A reload validates the file exactly as ``corsproxy check`` does (the same loader,
the same ``--upstream/--host/--port`` overrides). Then:

- **valid**: the new policy (``cors``, ``routes`` and the routes' upstream timeouts)
  is swapped in with one assignment (:meth:`corsproxy.server.Proxy.swap`): new
  requests use it at once, requests in flight finish under the one they started
  with, no connection is dropped. Keys that need a restart (``listen``,
  ``upstream`` apart from the route timeouts, ``websocket``, ``admin``) keep their
  running values, and each changed one is reported in one line;
- **invalid**: the running policy stays, every error is logged in ``check``'s
  format (``FILE: field.path: what, and how to fix``), and the failure is counted.

With ``listen.workers > 1`` every worker watches the files itself, and the parent
passes SIGHUP on to every worker, so all of them switch within one poll interval.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .config import ConfigError

if TYPE_CHECKING:
    from .config import Config

__all__ = ["POLL_INTERVAL", "RESTART_KEYS", "Reloader"]

#: Seconds between two looks at the watched files.
POLL_INTERVAL = 1.0
#: Sections whose changes need a restart (kept as they run).
RESTART_KEYS = ("listen", "upstream", "websocket", "admin", "log")


def _stamp(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ..data link changes the inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Reloader:
    """Watches ``config.source`` and ``config.watched_files``; calls ``apply(new)``
    with each valid new config. ``load()`` reads and validates the file (raises
    :class:`~corsproxy.config.ConfigError`). ``say(event, message, **fields)``
    writes one log line. ``on_result(ok, errors)`` records the outcome (metrics, the admin page)."""

    def __init__(
        self,
        config: Config,
        load: Callable[[], Config],
        apply: Callable[[Config], None],
        say: Callable[..., None],
        on_result: Callable[[bool, list[str]], None] | None = None,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.config = config  # what runs (its listen may hold a worker's bound port)
        self.load = load
        self.apply = apply
        self.say = say
        self.on_result = on_result
        self.interval = interval
        self._stamps = self._look(config)
        # Restart-only sections are compared with what the loader gave last time, not
        # with the running values (a worker runs with its bound port in listen.port).
        try:
            self._loaded = load()
        except ConfigError:  # pragma: no cover - the file changed since start-up
            self._loaded = config
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _paths(self, config: Config) -> list[str]:
        return [config.source, *config.watched_files]

    def _look(self, config: Config) -> dict[str, Any]:
        return {path: _stamp(path) for path in self._paths(config)}

    def start(self) -> None:
        """Start polling. A policy that changed between the moment the running config
        was read and now (start-up, or a worker forked with the parent's start-up
        config after an earlier reload) is applied at once, not left for a change
        that may never come."""
        self._loop = asyncio.get_running_loop()
        running = self.config
        loaded = self._loaded
        if (loaded.cors, loaded.routes, loaded.watched_files) != (
            running.cors, running.routes, running.watched_files
        ):
            self.reload("the file changed since this process read it")
        self._timer = self._loop.call_later(self.interval, self._poll)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _poll(self) -> None:
        self._timer = None
        try:
            stamps = self._look(self.config)
            if stamps != self._stamps:
                changed = [p for p in stamps if stamps[p] != self._stamps.get(p)]
                self.reload(f"{', '.join(changed)} changed")
        finally:
            if self._loop is not None:
                self._timer = self._loop.call_later(self.interval, self._poll)

    def reload(self, why: str = "SIGHUP") -> bool:
        """Load, validate and (when valid) apply the config; True when applied."""
        old = self.config
        # Stamps from before the load: a write that lands while it runs is seen by
        # the next poll (never lost between the load and a later look).
        before = self._look(old)
        try:
            new = self.load()
        except ConfigError as exc:
            for line in exc.errors:
                self.say("reload-error", line)
            self.say("reload-failed", f"reload ({why}) failed: {len(exc.errors)} "
                                      f"error{'s' if len(exc.errors) != 1 else ''}; still "
                                      f"serving the previous policy", errors=len(exc.errors))
            if self.on_result is not None:
                self.on_result(False, list(exc.errors))
            self._stamps = before
            return False
        changed = [key for key in RESTART_KEYS
                   if hasattr(new, key) and getattr(new, key) != getattr(self._loaded, key)]
        self._loaded = new
        kept = [key for key in RESTART_KEYS if hasattr(new, key)]
        new = dataclasses.replace(new, **{k: getattr(old, k) for k in kept})
        if changed:
            for key in changed:
                self.say("reload-restart-needed",
                         f"{key}: changed in {new.source}, but only a restart applies it; "
                         f"the running values are kept", section=key)
        try:
            self.apply(new)
        except Exception as exc:  # e.g. a certificate that changed again since the load
            self.say("reload-error", f"{new.source}: {exc}")
            self.say("reload-failed", f"reload ({why}) failed: {exc}; still serving the "
                                      f"previous policy", errors=1)
            if self.on_result is not None:
                self.on_result(False, [f"{new.source}: {exc}"])
            self._stamps = before
            return False
        self.config = new
        stamps = self._look(new)
        stamps.update((p, before[p]) for p in before if p in stamps)
        self._stamps = stamps
        for w in new.warnings:
            self.say("config-warning", f"warning: {w}")
        self.say("reloaded", f"reloaded the policy from {new.source} ({why})",
                 at=time.time())
        if self.on_result is not None:
            self.on_result(True, [])
        return True
