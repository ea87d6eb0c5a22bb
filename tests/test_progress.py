"""Progress reports reach RunPod in order (f5worker.jobs.progress), through runpod's own sender.

A loopback HTTP server stands in for RunPod's job API (a real server, receiving what runpod's SDK
posts to ``RUNPOD_WEBHOOK_POST_OUTPUT``); it is slow to take the first post (0.3 s), as a network
can be. A child process (runpod reads the URL once, at import) sends a job's reports 1..N.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from f5worker.jobs.progress import OrderedProgress
from tests.processes import REPO

REPORTS = 12
CHILD = r"""
import sys, time
import runpod
from f5worker.jobs.progress import OrderedProgress
send = runpod.serverless.modules.rp_progress._thread_target
ordered = sys.argv[1] == "ordered"
report = OrderedProgress(send).report if ordered else runpod.serverless.progress_update
job = {"id": "job-1"}
for done in range(1, int(sys.argv[2]) + 1):
    report(job, {"chunks_done": done, "chunks_total": int(sys.argv[2])})
    time.sleep(0.01)  # a chunk sampled every 10 ms
time.sleep(4)  # the last posts land
"""


@pytest.fixture
def job_api():
    received: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body["output"]["chunks_done"] == 1:
                time.sleep(0.3)  # a slow first post: the later ones, each on its own thread, overtake it
            received.append(body["output"]["chunks_done"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/done", received
    server.shutdown()


def send_reports(url: str, mode: str) -> None:
    env = {**os.environ, "RUNPOD_WEBHOOK_POST_OUTPUT": url, "RUNPOD_LOG_LEVEL": "ERROR", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(REPORTS)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_reports_through_runpods_own_sender_arrive_in_order(job_api):
    url, received = job_api
    send_reports(url, "ordered")
    assert received and received == sorted(received) and received[-1] == REPORTS  # never an older one after


def test_runpods_progress_update_alone_lets_reports_overtake_each_other(job_api):
    """What the worker used to send: one thread per report. Shows the fault the above prevents."""
    url, received = job_api
    send_reports(url, "plain")
    assert sorted(received) == list(range(1, REPORTS + 1)) and received != sorted(received)


def test_a_slow_send_skips_to_the_newest_report_and_a_failed_one_is_only_logged(caplog):
    sent = []

    def send(job, update):
        if update["n"] == 2:
            raise OSError("connection reset")
        time.sleep(0.05)
        sent.append(update["n"])

    progress = OrderedProgress(send)
    for n in range(1, 8):
        progress.report({"id": "j"}, {"n": n})
    deadline = time.monotonic() + 5
    while not progress.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert progress.idle() and sent == sorted(sent) and sent[-1] == 7 and len(sent) < 7


def test_a_report_after_the_job_finished_is_never_sent():
    """Once a job has ended (its result is being returned), a report made for it is ignored: it
    would reach RunPod as IN_PROGRESS after the result."""
    sent = []
    progress = OrderedProgress(lambda job, update: sent.append(update["n"]))
    progress.report({"id": "j"}, {"n": 1})
    progress.finish({"id": "j"})
    progress.report({"id": "j"}, {"n": 2})
    progress.report({"id": "other"}, {"n": 3})
    deadline = time.monotonic() + 5
    while not progress.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert progress.idle() and 2 not in sent and sent[-1] == 3
