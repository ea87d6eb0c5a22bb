"""``F5_SERVE=http``: the worker as an HTTP server on a RunPod load-balancing endpoint.

Why this module exists: RunPod's load balancer sends ``GET /ping`` to ``PORT_HEALTH`` from the
worker's first seconds (200 ready, 204 initialising, anything else unhealthy) and requests to
``PORT``. So the servers listen first and the models load afterwards, in a thread of their own:
``/ping`` answers 204 meanwhile, 200 once the worker is ready, 503 with the start error's sentence
if it could not start (RunPod then replaces the worker). SIGTERM: uvicorn stops accepting and
waits for the requests in flight, then the speech jobs still writing their records; the jobs'
guard (``jobs.guard.JobGuard``, chained in front of uvicorn's handler once the worker is ready)
ends those still running after its grace, and the process after its exit bound.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

import uvicorn

from f5worker.http.app import ServerState, make_app, make_ping_app
from f5worker.jobs.guard import EXIT_AFTER_S, SHUTDOWN_GRACE_S
from f5worker.service import error_sentence, load_worker
from f5worker.settings import Settings

log = logging.getLogger(__name__)


class ApiServer(uvicorn.Server):
    """The ``PORT`` server: uvicorn's SIGINT/SIGTERM handling, without raising the signal again once
    it has stopped (uvicorn does, which ends the process with the signal's default action before the
    speech jobs still finishing, their records and stored copies, are awaited)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class HealthServer(uvicorn.Server):
    """The ``PORT_HEALTH`` server: the main server owns the signals and ends it."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def server_config(app, settings: Settings, port: int, *, access_log: bool) -> uvicorn.Config:
    # log_config None: the entry point configures logging; the grace lets the jobs' guard answer first
    return uvicorn.Config(app, host=settings.http_host, port=port, log_config=None, access_log=access_log,
                          lifespan="off", timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S + EXIT_AFTER_S))


def start_loading(state: ServerState, loop: asyncio.AbstractEventLoop) -> threading.Thread:
    """The worker built in a thread of its own (a daemon: a shutdown while loading does not wait)."""
    def load() -> None:
        worker, start_error = load_worker(state.settings)
        if start_error is not None:
            loop.call_soon_threadsafe(state.failed, error_sentence(start_error))
        else:
            loop.call_soon_threadsafe(became_ready, state, worker)

    thread = threading.Thread(target=load, name="startup", daemon=True)
    thread.start()
    return thread


def became_ready(state: ServerState, worker) -> None:
    state.ready(worker)
    state.runner.guard.watch_sigterm()  # on the main thread, after uvicorn installed its handler
    log.info("ready: OpenAI's speech API on %s:%d", state.settings.http_host, state.settings.port)


async def serve_forever(state: ServerState) -> bool:
    """The servers until SIGTERM; False if the API's port could not be opened."""
    settings = state.settings
    main = ApiServer(server_config(make_app(state), settings, settings.port, access_log=True))
    servers = [main]
    if settings.health_port != settings.port:
        servers.append(HealthServer(server_config(make_ping_app(state), settings, settings.health_port,
                                                  access_log=False)))
    running = [asyncio.ensure_future(server.serve()) for server in servers]
    while not all(server.started for server in servers) and not any(task.done() for task in running):
        await asyncio.sleep(0.01)
    if all(server.started for server in servers):
        start_loading(state, asyncio.get_running_loop())
    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*running, return_exceptions=True)
    await finish_jobs(state)
    return main.started


async def finish_jobs(state: ServerState) -> None:
    """Speech jobs whose answers have ended but whose records or stored copies are still being
    written, awaited within the shutdown bound (the jobs' guard ends any still running after it)."""
    if state.jobs:
        log.info("shutdown: waiting for %d speech job(s) to finish", len(state.jobs))
        await asyncio.wait(set(state.jobs), timeout=SHUTDOWN_GRACE_S + EXIT_AFTER_S)


def serve_http(settings: Settings) -> int:
    state = ServerState(settings)
    return 0 if asyncio.run(serve_forever(state)) else 1
