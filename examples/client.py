#!/usr/bin/env python3
"""Send jobs to the F5-TTS worker with runpod's own client: upload a voice, synthesise, download.

Why this module exists: a caller needs more than ``runpod.Endpoint(...).run_sync(...)``, which
returns None for a failed job (the SDK drops the worker's error sentence) and gives up on long jobs.
This client submits with ``Endpoint.run``, polls the job's status (showing progress while it waits),
shows a failed job's error as the worker's one sentence, and writes the audio to a file. It needs
only the runpod package (which brings requests and tqdm), so it can be copied out of this repository.

    python examples/client.py --endpoint ENDPOINT_ID tts "Hello there." --voice my-voice.wav -o hello.wav
    python examples/client.py --endpoint ENDPOINT_ID upload my-voice.wav https://example.com/clip.wav
    python examples/client.py --endpoint ENDPOINT_ID upload my-voice.wav ./clip.wav --ref-text "..."
    python examples/client.py --endpoint ENDPOINT_ID tts "Long text ..." --voice my-voice.wav --no-wait
    python examples/client.py --endpoint ENDPOINT_ID download JOB_ID -o later.wav
    python examples/client.py --local tts "Hello." --voice basic_ref_en.wav -o hello.wav
    python examples/client.py --endpoint ENDPOINT_ID tts "Long text ..." --voice my-voice.wav --stream -o long.wav

``--stream`` (for an endpoint with F5_STREAMING=1) sends ``"stream": true`` and reads the job's
stream as it comes: the raw 16-bit PCM pieces are appended to ``<output>.pcm`` as they arrive (play
it while it grows, e.g. ``ffplay -f s16le -ar 24000 -ac 1 long.pcm``; the file is made with the
first piece, so a job that sends none leaves none), then the final result's file is written to
``-o`` as usual. On an endpoint with streaming on, a job's output is the list of what
it yielded; the client takes its last item, the result.

A voice given as a URL is sent as ``voice_file_url`` (the worker downloads it); a local file is
sent inline as ``voice_base64``, which RunPod carries only up to its request size limit. ``--local``
talks to runpod's development server on this machine (``python runpod-handler.py --rp_serve_api
--rp_api_host 127.0.0.1``, port 8000). The API key comes from ``RUNPOD_API_KEY`` or runpod's
credentials file (``runpod config``). Exit status: 0 done, 1 the job failed (its sentence on
stderr), 2 the API could not be used, 3 the job was still running when ``--timeout`` passed (fetch
it later with ``download``).

    from examples.client import main
    main(["--local", "tts", "Hello.", "--voice", "basic_ref_en.wav", "-o", "hello.wav"])
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, TextIO
from urllib.parse import urlsplit
from urllib.request import url2pathname

import requests
import runpod
from tqdm import tqdm

# The caller's variable, read only here: the worker never reads it, so it is not among the worker's
# variables in f5worker/settings.py (which this file does not import, to stay standalone).
ENV_API_KEY = "RUNPOD_API_KEY"
LOCAL_BASE_URL = "http://127.0.0.1:8000"  # runpod's development server, --rp_api_port's default
# The development server serves /run and /status/<id> with no /<endpoint id>/ prefix; runpod's
# client requests {base}/{endpoint id}/run. With the id ".", {base}/./run is normalised (RFC 3986
# dot segments, by requests) to {base}/run.
LOCAL_ENDPOINT_ID = "."
LOCAL_API_KEY = "local"  # runpod's client refuses to start without a key; the local server ignores it
RUN_PAYLOAD_LIMIT_BYTES = 10_000_000  # RunPod's documented limit for one /run request (10 MB)
FINAL_STATES = {"COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED"}
STATUS_TIMEOUT_S = 10  # one status request to RunPod's API
DOWNLOAD_TIMEOUT_S = (10, 60)  # connect, then the longest silence while reading the audio
PCM_FORMAT = "pcm_s16le"  # what a streamed job's pieces hold
TTS_OPTIONS = ("ref_text", "speed", "nfe_step", "cfg_strength", "sway_sampling_coef", "cross_fade_duration",
               "seed")


class ClientError(Exception):
    """What went wrong, as one sentence for the person at the terminal."""


class StillRunning(ClientError):
    """The job goes on past the client's timeout; ``download`` fetches its result later."""

    def __init__(self, job_id: str, timeout_s: float, status: str | None = None):
        state = f"is still {status} after" if status else "did not finish within"
        super().__init__(f"Job {job_id} {state} {timeout_s:g} s; fetch it later with: download {job_id}")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def failure_sentence(state: dict) -> str:
    """The sentence a failed job's status carries: the worker's ``error``, or runpod's own error
    report (a JSON string whose ``error_message`` is the sentence, with a traceback beside it)."""
    error = state.get("error")
    if isinstance(error, str):
        try:
            error = json.loads(error)
        except ValueError:
            pass
    if isinstance(error, dict):
        error = error.get("error_message") or error.get("error")
    if error:
        return one_line(error)
    status = state.get("status")
    if status == "TIMED_OUT":
        return "RunPod stopped the job: it ran past the endpoint's execution timeout."
    if status == "CANCELLED":
        return "The job was cancelled."
    return f"The job ended with status {status} and no error message."


# --- talking to the API ----------------------------------------------------------------------------

class Client:
    """One endpoint, on RunPod or on runpod's local development server."""

    def __init__(self, endpoint_id: str, *, local: bool, base_url: str | None = None,
                 api_key: str | None = None):
        self.local = local
        saved = runpod.endpoint_url_base
        self.base_url = base_url or (LOCAL_BASE_URL if local else saved)
        # runpod's client copies the module's base URL when it is built: set it for this one only.
        runpod.endpoint_url_base = self.base_url
        try:
            self.endpoint = runpod.Endpoint(endpoint_id, api_key=api_key)
        except RuntimeError as err:  # no key anywhere
            raise ClientError(f"No RunPod API key: set {ENV_API_KEY} or run `runpod config`.") from err
        finally:
            runpod.endpoint_url_base = saved
        if local:
            self.endpoint.rp_client.rp_session.trust_env = False  # loopback: no proxy, no .netrc

    def submit(self, job_input: dict) -> str:
        """The job's id (``Endpoint.run``: POST {base}/{endpoint}/run)."""
        return self.endpoint.run({"input": job_input}).job_id

    def answer(self, route: str, job_id: str, deadline: float) -> dict:
        """One answer of RunPod's ``/{route}/<id>`` (``status`` or ``stream``)."""
        path = f"{self.endpoint.endpoint_id}/{route}/{job_id}"
        if self.local:
            # The development server answers these with POST only, and runs the job inside that
            # request, so this call lasts as long as the job.
            return self.endpoint.rp_client.post(path, None, timeout=max(1.0, deadline - time.monotonic()))
        return self.endpoint.rp_client.get(path, timeout=STATUS_TIMEOUT_S)

    def answers(self, route: str, job_id: str, *, timeout_s: float, poll_s: float) -> Iterator[dict]:
        """Each answer of ``/{route}/<id>`` until the job ends, the last one COMPLETED's; ClientError
        with its sentence if it fails; StillRunning after ``timeout_s`` (the job goes on;
        ``download`` fetches it later)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                state = self.answer(route, job_id, deadline)
            except requests.Timeout as err:  # locally the job itself; remotely one slow answer
                if self.local or time.monotonic() >= deadline:
                    raise StillRunning(job_id, timeout_s) from err
                state = {"status": "UNKNOWN"}
            except (requests.ConnectionError, requests.HTTPError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.JSONDecodeError) as err:  # a poll cut off, or a gateway's page
                state = self.unanswered(err, job_id, timeout_s, deadline)
            yield state
            status = state.get("status", "UNKNOWN")
            if status == "COMPLETED":
                return
            if status in FINAL_STATES:
                raise ClientError(failure_sentence(state))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StillRunning(job_id, timeout_s, status)
            time.sleep(min(poll_s, remaining))

    def unanswered(self, err: requests.RequestException, job_id: str, timeout_s: float, deadline: float) -> dict:
        """A poll RunPod's API did not answer (a dropped connection, a 5xx from its gateway, a 429):
        asked again until the deadline, for the job goes on and is billed. Any other refusal ends the
        wait with the job's id in its sentence, so ``download`` can still fetch it later."""
        code = err.response.status_code if isinstance(err, requests.HTTPError) and err.response is not None else None
        if self.local:
            raise err  # the development server runs the job in each poll: asked again, it would run it again
        if code is None or code >= 500 or code == 429:  # 429: RunPod limits the rate of polls
            if time.monotonic() >= deadline:
                raise StillRunning(job_id, timeout_s) from err
            return {"status": "UNKNOWN"}
        raise ClientError(f"The API answered HTTP {code} about job {job_id}"
                          + (" (check the endpoint)" if code == 404 else "")
                          + f"; fetch it later with: download {job_id}") from err

    def stream(self, job_id: str, *, timeout_s: float, poll_s: float) -> Iterator[object]:
        """Each item the job yields, in order, as RunPod's ``/stream/<id>`` hands them out, until the
        job ends. (runpod's ``Job.stream()`` asks with GET, which the development server does not
        answer, and fails on the development server's answer once the job is gone; this is the same
        protocol with POST locally.)"""
        for state in self.answers("stream", job_id, timeout_s=timeout_s, poll_s=poll_s):
            for item in state.get("stream") or []:
                yield item.get("output") if isinstance(item, dict) else item

    def wait(self, job_id: str, *, timeout_s: float, poll_s: float, progress: "Progress") -> dict:
        """The job's output once it completes (the errors of ``answers``)."""
        for state in self.answers("status", job_id, timeout_s=timeout_s, poll_s=poll_s):
            status = state.get("status", "UNKNOWN")
            progress.show(status, None if status in FINAL_STATES else state.get("output"))
        return final_output(state.get("output"))  # the last answer: COMPLETED's


class Progress:
    """The job's status while the client waits: a live line (status, the worker's progress report
    if it sends one, elapsed time) on a terminal, one line per change otherwise."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.started = time.monotonic()
        self.last: str | None = None
        self.bar = tqdm(total=None, bar_format="{desc} [{elapsed}]", file=stream, leave=False) \
            if stream.isatty() else None

    def show(self, status: str, report) -> None:
        """``report``: what the worker last sent with runpod's progress_update, if anything."""
        if report in (None, "", {}, []):
            text = status
        else:
            text = f"{status}: {one_line(json.dumps(report) if isinstance(report, (dict, list)) else report)}"
        if self.bar is not None:
            self.bar.set_description_str(text)
        elif text != self.last:
            print(f"{text} ({time.monotonic() - self.started:.1f} s)", file=self.stream, flush=True)
        self.last = text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- job inputs and results ------------------------------------------------------------------------

def final_output(output) -> dict:
    """The job's result: its output, or on an endpoint that streams (whose output is the list of
    what the job yielded) the last item; ClientError with the sentence of a job that failed there."""
    if isinstance(output, list):
        output = output[-1] if output else None
    output = output or {}
    if isinstance(output, dict) and output.get("error"):
        raise ClientError(one_line(output["error"]))
    return output


def is_pcm_piece(item) -> bool:
    """A streamed job's audio piece (the worker's f5worker.jobs.streaming), not its final result."""
    return isinstance(item, dict) and item.get("format") == PCM_FORMAT and "chunk" in item


def receive_stream(client: "Client", job_id: str, pcm_path: Path, args: argparse.Namespace,
                   progress: "Progress") -> tuple[dict, int]:
    """Append the job's PCM pieces to ``pcm_path`` as they arrive; (the final result, pieces). The
    file is made with the first piece, so a job that sends none (refused, or on an endpoint that
    does not stream) leaves no empty file."""
    result, pieces, seconds, pcm = None, 0, 0.0, None
    try:
        for item in client.stream(job_id, timeout_s=args.timeout, poll_s=args.poll):
            if not is_pcm_piece(item):
                result = item
                continue
            if pcm is None:
                pcm_path.parent.mkdir(parents=True, exist_ok=True)
                pcm = open(pcm_path, "wb")
            pcm.write(base64.b64decode(item["audio_base64"], validate=True))
            pcm.flush()
            pieces += 1
            seconds += float(item.get("seconds") or 0)
            progress.show("STREAMING", {"pieces": pieces, "audio_seconds": round(seconds, 3),
                                        "sample_rate": item.get("sample_rate")})
    finally:
        if pcm is not None:
            pcm.close()
    if result is None:
        raise ClientError(f"Job {job_id} ended without a result.")
    return final_output(result), pieces


def tts_input(args: argparse.Namespace) -> dict:
    job = {"text": args.text, "local_voice": args.voice}
    job.update({name: getattr(args, name) for name in TTS_OPTIONS if getattr(args, name) is not None})
    if args.remove_silence:
        job["remove_silence"] = True
    if args.stream:
        job["stream"] = True
    return job


def upload_input(args: argparse.Namespace) -> dict:
    job = {"endpoint": "upload", "voice_name": args.name}
    if urlsplit(args.source).scheme in ("http", "https"):
        job["voice_file_url"] = args.source
    else:
        path = Path(args.source)
        if not path.is_file():
            raise ClientError(f"{args.source} is neither an http(s) URL nor a file.")
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        if len(encoded) > RUN_PAYLOAD_LIMIT_BYTES - 4096:  # room for the rest of the request
            raise ClientError(f"{path.name} is too large to send inline ({len(encoded) / 1e6:.1f} MB as base64; "
                              f"RunPod accepts {RUN_PAYLOAD_LIMIT_BYTES / 1e6:g} MB per request): put it at an "
                              "http(s) URL and pass that instead.")
        job["voice_base64"] = encoded
    if args.ref_text is not None:
        job["ref_text"] = args.ref_text
    return job


def save_audio(output: dict, dest: Path) -> Path:
    """Write the result's audio to ``dest``: inline (``audio_base64``), from an http(s) URL, or
    copied from a ``file://`` path (a worker on this machine with local storage)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if output.get("audio_base64"):
                out.write(base64.b64decode(output["audio_base64"], validate=True))
            else:
                _copy_url(str(output.get("audio_url") or ""), out)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _copy_url(url: str, out) -> None:
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        try:
            with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
                if response.status_code != 200:  # the URL itself is never shown: it is a credential
                    raise ClientError(f"Downloading the audio failed with HTTP {response.status_code} "
                                      "(a presigned URL expires after S3_PRESIGN_EXPIRY_SECONDS).")
                for chunk in response.iter_content(chunk_size=1 << 16):
                    out.write(chunk)
        except requests.RequestException as err:
            raise ClientError(f"Downloading the audio failed ({type(err).__name__}).") from err
    elif parts.scheme == "file":
        source = Path(url2pathname(parts.path))
        if not source.is_file():
            raise ClientError(f"The result is the file {source} on the worker, which this machine does not "
                              "have: give the worker a bucket (S3_BUCKET) to get download URLs.")
        with open(source, "rb") as data:
            while chunk := data.read(1 << 16):
                out.write(chunk)
    else:
        raise ClientError("The result carries no audio (neither audio_url nor audio_base64).")


# --- command line ----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="client.py", description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", metavar="ID", help="the RunPod endpoint id")
    target.add_argument("--local", action="store_true",
                        help=f"runpod's development server on this machine ({LOCAL_BASE_URL})")
    parser.add_argument("--local-url", default=LOCAL_BASE_URL, help="the development server's address")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a job (default 600)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between status requests")
    commands = parser.add_subparsers(dest="command", required=True)

    tts = commands.add_parser("tts", help="synthesise text in a stored (or built-in) voice")
    tts.add_argument("text")
    tts.add_argument("--voice", required=True, help="e.g. my-voice.wav, or basic_ref_en.wav (built in)")
    tts.add_argument("--ref-text", dest="ref_text")
    tts.add_argument("--speed", type=float)
    tts.add_argument("--nfe-step", dest="nfe_step", type=int)
    tts.add_argument("--cfg-strength", dest="cfg_strength", type=float)
    tts.add_argument("--sway-sampling-coef", dest="sway_sampling_coef", type=float)
    tts.add_argument("--cross-fade-duration", dest="cross_fade_duration", type=float)
    tts.add_argument("--remove-silence", dest="remove_silence", action="store_true")
    tts.add_argument("--seed", type=int)
    tts.add_argument("-o", "--output", type=Path, default=Path("output.wav"), help="where to write the WAV")
    tts.add_argument("--no-wait", action="store_true", help="print the job id and return")
    tts.add_argument("--stream", action="store_true",
                     help="stream the audio (endpoint with F5_STREAMING=1): raw PCM to <output>.pcm as it comes")

    upload = commands.add_parser("upload", help="store a voice (from an http(s) URL or a local file)")
    upload.add_argument("name", help="the voice's name, e.g. my-voice.wav")
    upload.add_argument("source", help="an http(s) URL the worker downloads, or a local file sent inline")
    upload.add_argument("--ref-text", dest="ref_text", help="what the speaker says (else transcribed)")
    upload.add_argument("--no-wait", action="store_true", help="print the job id and return")

    download = commands.add_parser("download", help="wait for a submitted TTS job and write its audio")
    download.add_argument("job_id")
    download.add_argument("-o", "--output", type=Path, default=Path("output.wav"))
    return parser.parse_args(argv)


def run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    client = Client(LOCAL_ENDPOINT_ID if args.local else args.endpoint, local=args.local,
                    base_url=args.local_url if args.local else None,
                    api_key=LOCAL_API_KEY if args.local else os.environ.get(ENV_API_KEY) or None)
    if args.command == "download":
        job_id = args.job_id
    else:
        job_id = client.submit(tts_input(args) if args.command == "tts" else upload_input(args))
        if args.no_wait:
            print(json.dumps({"id": job_id}), file=stdout)
            return 0
    progress = Progress(stderr)
    streamed = None
    try:
        if getattr(args, "stream", False):
            pcm_path = args.output.with_suffix(".pcm")
            output, pieces = receive_stream(client, job_id, pcm_path, args, progress)
            streamed = {"pcm_file": str(pcm_path) if pieces else None, "pieces_received": pieces}
        else:
            output = client.wait(job_id, timeout_s=args.timeout, poll_s=args.poll, progress=progress)
    finally:
        progress.close()
    shown = {k: v for k, v in output.items() if k != "audio_base64"}
    if streamed is not None:
        shown.update(streamed)
    if args.command in ("tts", "download"):
        shown["file"] = str(save_audio(output, args.output))
    print(json.dumps({"id": job_id, **shown}, ensure_ascii=False), file=stdout)
    return 0


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    args = parse_args(argv)
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        return run(args, stdout, stderr)
    except StillRunning as err:
        print(err, file=stderr)
        return 3
    except ClientError as err:
        print(err, file=stderr)
        return 1
    except requests.ConnectionError:
        where = args.local_url if args.local else "the RunPod API"
        print(f"Could not connect to {where}" + (" (is runpod-handler.py --rp_serve_api running?)."
                                                  if args.local else "."), file=stderr)
        return 2
    except requests.HTTPError as err:
        code = err.response.status_code if err.response is not None else "?"
        print(f"The API answered HTTP {code}" + (" (check the endpoint and job id)." if code == 404 else "."),
              file=stderr)
        return 2
    except OSError as err:  # the output file (requests' own errors are OSErrors too: caught above)
        print(f"Could not write {getattr(err, 'filename', None) or 'the output'}: "
              f"{err.strerror or type(err).__name__}.", file=stderr)
        return 2
    except RuntimeError as err:  # runpod's client: "401 Unauthorized | Make sure Runpod API key is set ..."
        print(one_line(err), file=stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
