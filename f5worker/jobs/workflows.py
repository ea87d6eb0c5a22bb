"""The jobs (TTS, and the voice library's upload, list, info and delete) as async workflows over the
engine, storage and voices.

Why this module exists: it keeps the handler a router. Each workflow stages its files as
``<tmp>/<job_id>_*`` and removes them on every way out, runs blocking I/O off the event loop (so
other jobs keep batching), drives the GPU only through the batcher's one thread, and writes a small
JSON record per job under ``logs/`` (sizes and timings; never credentials or the job's text).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable, Iterator

import numpy as np
import soundfile as sf

from f5worker.jobs import audio
from f5worker.jobs.assembly import Assembled, AudioAssembly, AudioWriter, planned_segments_bytes
from f5worker.jobs import encoding
from f5worker.jobs import streaming
from f5worker.inference.batcher import Batcher, JobTurn
from f5worker.inference.items import item_work
from f5worker.jobs.download import download_to_file
from f5worker.inference.engine import TTSEngine
from f5worker.inference.models import ModelPool
from f5worker.inference.transcriber import Heard
from f5worker.errors import SHOWN_KEY_CHARS, InputError, ModelUnavailable, StorageError, WorkerError, shown
from f5worker.jobs.inputs import (MAX_SEED, DeleteVoiceInput, ListModelsInput, ListVoicesInput, TTSInput,
                                  UploadInput, VoiceInfoInput, check_spoken_length)
from f5worker.jobs.plan import JobPlan, SynthesisRequest, plan_segments, planned_samples
from f5worker.model.constants import TARGET_RMS
from f5worker.jobs.guard import COMMITTING
from f5worker.jobs.tempfiles import job_paths, staging_error
from f5worker.jobs.memory import HeapTrimmer
from f5worker.jobs.normalize import normalize_texts
from f5worker.jobs.verify import ChunkReport, GuardedSampling, GuardOptions, job_summary
from f5worker.jobs.subtitles import SUBTITLE_FORMATS
from f5worker.jobs.word_times import ChunkWords, add_word_times, subtitle_text
from f5worker.jobs.models import JobModels
from f5worker.jobs.threads import outlast
from f5worker.model.store import ModelFiles
from f5worker.jobs.resampling import least_output_length, most_output_length
from f5worker.jobs.results import (Delivery, InlineAudio, StoredOutputs, SubtitlesFile, brief_reason,
                                   older_subtitles_keys, output_key_for, output_stem, subtitles_key_for, tts_result,
                                   widest_result_bytes, widest_subtitles_error)
from f5worker.settings import ENV_ASR_MODEL, ENV_MAX_VOICE_BYTES, LOGS_PREFIX, Settings
from f5worker.jobs.voices import (TRANSCRIBED, Voice, VoiceLibrary, clipped_refusal, decode_base64_voice, incoming_key,
                             prepare_upload)
from s3_utils import KeyNotFound, ObjectTooLarge, Storage
from f5worker.model.constants import SAMPLE_RATE

log = logging.getLogger(__name__)


@contextlib.contextmanager
def job_files(tmp_dir: Path, job_id: str) -> Iterator[dict[str, Path]]:
    """The job's staging paths (the guide's ``/tmp/{job_id}_voice.wav`` and ``_output.wav``),
    removed however the job ends."""
    if not tmp_dir.is_dir():
        raise staging_error(tmp_dir, FileNotFoundError())
    paths = job_paths(tmp_dir, job_id)
    try:
        yield paths
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class JobVoice:
    """One voice of a TTS job: the voice, its transcript, and where that came from."""

    voice: Voice
    ref_text: str
    ref_text_source: str


class JobClock:
    """A job's ``timings``: seconds since it started, and seconds per named step (a step timed
    twice adds up)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}

    def since_start(self) -> float:
        return time.perf_counter() - self.started

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        mark = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - mark


def synthesis_requests(job: TTSInput, segments: list[tuple[str, str]], voices: dict[str, JobVoice], seed: int, *,
                       streamed: bool, model: str) -> list[SynthesisRequest]:
    """One request per segment of the job's text, each in its voice; a streamed job's first is cut short."""
    return [SynthesisRequest(
        prepared_ref=voices[name].voice.reference,  # kept prepared with the voice (jobs.voices.VoiceCache)
        ref_audio=voices[name].voice.used, ref_sr=voices[name].voice.sr, ref_text=voices[name].ref_text,
        gen_text=text, seed=seed, speed=job.speed, nfe_step=job.nfe_step, cfg_strength=job.cfg_strength,
        sway_sampling_coef=job.sway_sampling_coef, cross_fade_duration=job.cross_fade_duration,
        remove_silence=job.remove_silence, short_first_chunk=streamed and index == 0, model=model)
        for index, (name, text) in enumerate(segments)]


def engine_like(pool: ModelPool, settings: Settings, files: ModelFiles) -> TTSEngine:
    """Another registered model's engine, loaded as the default's was: the pool's device, the fast
    path as configured, and the one vocoder every model shares."""
    return TTSEngine.load(files, device=pool.device, fast=settings.fast_path,
                          graph_memory_bytes=settings.graph_memory_mb * 2**20, vocoder=pool.vocoder)


def one_job(workflow):
    """A job's workflow, counted while it runs; as it ends the heap may be trimmed
    (``f5worker.jobs.memory``: at once when the worker falls idle)."""
    @functools.wraps(workflow)
    async def run(self: "Worker", *args, **kwargs):
        self.in_flight += 1
        try:
            return await workflow(self, *args, **kwargs)
        finally:
            self.in_flight -= 1
            await self._off_loop(self.heap.after_job, self.in_flight)
    return run


class Worker:
    """Everything a job needs, created once per worker process."""

    def __init__(self, settings: Settings, engine: TTSEngine, storage: Storage, transcriber=None):
        """``engine``: the default model's (f5worker.model.registry); the others load on first use."""
        self.settings = settings
        self.storage = storage
        pool = ModelPool(settings.default_model, engine, budget_bytes=settings.model_memory_mb * 2**20)
        self.batcher = Batcher(pool.start_call)
        self.models = JobModels(settings, pool, load_engine=functools.partial(engine_like, pool, settings),
                                on_model_thread=self._on_gpu_thread, off_loop=self._off_loop,
                                on_loaded=self._prepare_in_background)
        self.transcriber = transcriber
        self.voices = VoiceLibrary(storage, self._transcribe if transcriber is not None else None,
                                   cache_size=settings.voice_cache_size, max_voice_bytes=settings.max_voice_bytes)
        self._transcriptions: dict[tuple[str, str], asyncio.Future] = {}
        self._stems_storing: dict[str, list] = {}  # output stem -> [its lock, jobs holding or awaiting it]
        self.heap = HeapTrimmer()
        self.in_flight = 0  # workflows running, for the heap trimmer
        # Storage, download and file work of jobs in flight: a pool of its own, sized so that calls
        # left hanging (until their storage timeouts) never starve the other jobs of threads.
        self.io_threads = ThreadPoolExecutor(max_workers=max(8, 4 * settings.max_concurrency),
                                             thread_name_prefix="job-io")
        self.transcriptions = 0  # Whisper runs, for logs and tests

    def _prepare_in_background(self, engine: TTSEngine) -> None:
        """A model loaded after start gets what the default got at start (f5worker.service): its
        single-job graphs captured while idle, then the fast path's switches checked on it."""
        self.batcher.prepare_in_background(engine.background_tasks(self.settings.kernel_cache,
                                                                   self.settings.fused_kernels))

    @property
    def engine(self) -> TTSEngine | None:
        """The default model's engine (its vocoder is every model's); None while it is unloaded."""
        return self.models.pool.default_engine

    def _transcribe(self, samples, sr) -> str:
        return self.transcriber.transcribe(samples, sr)

    async def _on_gpu_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.batcher.executor, fn, *args)

    @one_job
    async def tts(self, job_id: str, job: TTSInput, on_audio: Callable[[object], None] | None = None,
                  on_progress: Callable[[dict], None] | None = None, *, stream: streaming.LiveAudio | None = None,
                  store: bool = True) -> dict:
        """The TTS job. ``on_audio`` receives what ``stream`` makes of each chunk as soon as it is
        known (by default the queue face's pieces, ``jobs.streaming.AudioStream``; a job that removes
        silences gets it all at the end); ``on_progress`` receives, for a job of several chunks,
        ``{"chunks_done", "chunks_total", "audio_seconds"}`` after each chunk, in order. Without
        ``store`` the audio is only streamed: nothing is encoded whole, uploaded or inline."""
        clock = JobClock()
        seed = job.seed if job.seed is not None else random.randint(0, MAX_SEED)
        fmt = encoding.FORMATS[job.output_format]
        if on_audio is not None and stream is None:
            stream = streaming.AudioStream(job.sample_rate, job.cross_fade_duration)
        live = stream is not None and not job.remove_silence
        model = self.models.name_for(job.model)
        with job_files(self.settings.tmp_dir, job_id) as paths, self.models.pool.in_use(model):
            clock.timings.update(download_s=clock.since_start(), transcription_s=0.0)
            segments, normalized = await self._spoken_segments(job, model)
            voices = await self._job_voices(job, segments, paths["voice.wav"], clock.timings)
            if waited := await self.models.ensure_loaded(model):
                clock.timings["model_load_s"] = waited
            with clock.step("synthesis_s"):
                plan = await self._off_loop(functools.partial(
                    plan_segments, synthesis_requests(job, segments, voices, seed, streamed=live, model=model),
                    written_bytes=len(job.text.encode("utf-8"))))
                fields = await self._widest_fields(job_id, job, fmt, list(voices), plan, stream, normalized,
                                                   store=store)
                self._refuse_early(plan, fmt, job, stream if live else None, fields_bytes=fields)
            await self._whisper_for_options(job, clock)
            with clock.step("synthesis_s"):
                words = self._chunk_words(job, plan)
                if words is not None:
                    await words.check()
                assembly = await self._assembly(job, fmt, paths["output.wav"] if store else None, stream, live=live,
                                                most_samples=most_output_length(planned_samples(plan), job.sample_rate))
            assembled, reports = await self._synthesize(plan, job, assembly, stream, on_audio, on_progress, clock,
                                                        live=live, words=words)
            verified = _verification(assembled, reports)
            if job.timestamps is not None:
                add_word_times(assembled)
            extras = {**({"normalized": normalized} if normalized is not None else {}),
                      **({"verify": verified} if verified is not None else {})}
            delivery = Delivery(job_id, job, fmt, output_key_for(job_id, job.output_key, fmt), stream, extras)
            if store:
                result = await self._store(delivery, assembled, voices, plan, seed, paths, clock)
            else:
                result = self._unstored_result(delivery, voices, plan, seed, assembled)
        clock.timings["total_s"] = clock.since_start()
        result["timings"] = _rounded(clock.timings)
        duration = result["duration"]
        result["rtf"] = round(clock.timings["synthesis_s"] / duration, 4) if duration > 0 else None
        await self.record(job_id, "tts", "ok", voice=job.local_voice, model=model, text_chars=len(job.text),
                          chunks=len(plan.items),
                          audio_seconds=result["duration"], output_bytes=result["bytes"],
                          output_key=result["output_key"], format=result["format"], sample_rate=job.sample_rate,
                          inline="audio_base64" in result, ref_text_source=result["ref_text_source"],
                          voices_used=list(voices), timings=result["timings"], verify=result.get("verify"))
        return result

    async def _assembly(self, job: TTSInput, fmt: encoding.OutputFormat, staging: Path | None,
                        stream: streaming.LiveAudio | None, *, live: bool, most_samples: int) -> AudioAssembly:
        """Where the job's audio is put together as it is sampled: written to ``staging`` (when it
        is stored), and kept for a stream that gets it only at the end (silences removed)."""
        writer = None
        if staging is not None:
            writer = await self._staging(functools.partial(AudioWriter, most_samples=most_samples), staging, fmt,
                                         job.sample_rate)
        return AudioAssembly(sample_rate=job.sample_rate, cross_fade_seconds=job.cross_fade_duration,
                             remove_silence=job.remove_silence, writer=writer, keep=stream is not None and not live,
                             spill_dir=self.settings.tmp_dir)

    async def _spoken_segments(self, job: TTSInput, model: str) -> tuple[list[tuple[str, str]], dict | None]:
        """The job's text as (voice name, text) parts (one unless the job gives ``voices``), with
        its numbers as words if asked (``normalize``), and the result's ``normalized`` field."""
        segments = job.segments()
        if not job.normalize:
            return segments, None
        texts, normalized = await self._off_loop(normalize_texts, [text for _, text in segments],
                                                 self.models.registry[model].language)
        check_spoken_length(texts)
        return [(name, text) for (name, _), text in zip(segments, texts)], normalized

    async def _store(self, delivery: "Delivery", assembled: Assembled, voices: dict[str, JobVoice],
                     plan: JobPlan, seed: int, paths: dict[str, Path], clock: JobClock) -> dict:
        """The job's audio file (written as it was sampled) stored, and inline if asked; its result.
        A subtitle file goes up just after the audio: a failed audio upload changes nothing (the
        older pair of that key stands), and a failed subtitle upload (``StoredOutputs.tell``) still
        answers with the stored audio."""
        job, fmt, staging = delivery.job, delivery.fmt, paths["output.wav"]
        size = (await self._staging(staging.stat)).st_size
        with clock.step("upload_s"):
            url = await self._off_loop(self.storage.result_url, delivery.output_key)
            result = tts_result(job, **_job_fields(voices, plan), fmt=fmt, url=url, output_key=delivery.output_key,
                                seed=seed, duration=assembled.duration, segments=assembled.segments, size=size,
                                stream=delivery.stream, extras=delivery.extras)
            subtitles = None
            if job.subtitles is not None:
                subtitles = await self._subtitles_file(delivery, assembled, paths["subtitles"])
                result.update(subtitles_url=subtitles.url, subtitles_key=subtitles.key)
            # Whether the audio fits inline is settled before any upload: a job never fails after them.
            inline = self._inline_decision(delivery, result, size)
            if inline.too_large and job.return_base64:
                raise InputError(encoding.too_large_sentence(fmt, size, inline.room))
            # a write the caller sees: from here the job is seen through. A multipart upload stops
            # before its next part, and is aborted, once the guard sets ``stop`` (deadline, shutdown).
            stop = COMMITTING.setdefault(asyncio.current_task(), threading.Event())
            older = older_subtitles_keys(delivery.output_key, fmt, job)  # an earlier take's, of a key the caller chose
            async with self._stem_held(output_stem(delivery.output_key, fmt)):
                stored = await self._commit(self._upload_outputs, delivery.output_key, staging, fmt.content_type,
                                            subtitles, older, stop)
            stored.tell(result)
        with clock.step("encoding_s"):
            await self._attach_inline(delivery.job_id, result, inline, staging, size)
        return result

    @contextlib.asynccontextmanager
    async def _stem_held(self, stem: str):
        """One job at a time stores the audio and subtitles of an output key's stem in this worker,
        so a stored pair is one job's, and no job removes as older a subtitle file another has just
        stored. (Workers apart are not ordered: the README says so.) A lock lives while held or
        awaited, so none outlives its event loop."""
        held = self._stems_storing.setdefault(stem, [asyncio.Lock(), 0])
        held[1] += 1
        try:
            async with held[0]:
                yield
        finally:
            held[1] -= 1
            if not held[1]:
                del self._stems_storing[stem]

    async def _subtitles_file(self, delivery: "Delivery", assembled: Assembled, staging: Path) -> "SubtitlesFile":
        """The job's subtitle file, written to ``staging``, and where it will be stored: beside its
        audio (the same key, its own extension)."""
        fmt = delivery.job.subtitles
        key = subtitles_key_for(delivery.output_key, delivery.fmt, fmt)
        text = await self._off_loop(subtitle_text, assembled, fmt)
        await self._staging(staging.write_text, text, "utf-8")
        url = await self._off_loop(self.storage.result_url, key)
        return SubtitlesFile(key=key, url=url, path=staging, content_type=SUBTITLE_FORMATS[fmt])

    def _upload_outputs(self, key: str, staging: Path, content_type: str, subtitles: "SubtitlesFile | None",
                        older: list[str], stop: threading.Event) -> "StoredOutputs":
        """The audio stored, then its subtitle file (if any), then the older subtitle files of the
        key this job did not write removed: every change in one thread, so a job cancelled or
        stopped meanwhile (it waits for the thread, ``_off_loop``) cannot leave new audio beside a
        subtitle file not made for it. A failure after the audio is said, not raised."""
        self.storage.upload_file(key, staging, content_type, stop=stop)
        stored = StoredOutputs(subtitles=subtitles)
        if subtitles is not None:
            try:
                self.storage.upload_file(subtitles.key, subtitles.path, subtitles.content_type, stop=stop)
            except StorageError as err:
                log.warning("the audio was stored but its subtitle file was not: %s", err)
                stored.not_stored = brief_reason(err)
                older = [subtitles.key, *older]  # no older file of its own format stands beside the new audio
        for older_key in older:
            try:
                self.storage.delete(older_key)
            except StorageError as err:
                log.warning("an older subtitle file beside stored audio could not be removed: %s", err)
                stored.not_removed[older_key] = brief_reason(err)
        return stored

    @staticmethod
    def _unstored_result(delivery: "Delivery", voices: dict[str, JobVoice], plan: JobPlan, seed: int,
                         assembled: Assembled) -> dict:
        """The result of a job whose audio was only streamed (a job not stored is streamed): no URL,
        no key; its size is the stream's."""
        job, stream = delivery.job, delivery.stream
        return tts_result(job, **_job_fields(voices, plan), fmt=delivery.fmt, url=None, output_key=None, seed=seed,
                          duration=assembled.duration, segments=assembled.segments, size=stream.bytes_sent,
                          stream=stream, extras=delivery.extras)

    async def _job_voices(self, job: TTSInput, segments: list[tuple[str, str]], staging: Path,
                          timings: dict[str, float]) -> dict[str, JobVoice]:
        """Each voice of the text once, in order of first use (the job's ref_text is local_voice's)."""
        voices: dict[str, JobVoice] = {}
        for name, _ in segments:
            if name not in voices:
                given = job.ref_text if name == job.local_voice else None
                voices[name] = await self._voice(name, given, staging, timings)
        return voices

    async def _synthesize(self, plan: JobPlan, job: TTSInput, assembly: AudioAssembly,
                          stream: streaming.LiveAudio | None, on_audio: Callable[[object], None] | None,
                          on_progress: Callable[[dict], None] | None, clock: JobClock, *,
                          live: bool, words: ChunkWords | None) -> tuple[Assembled, list[ChunkReport] | None]:
        """The plan's chunks sampled through the batcher (judged and sampled again where they fail,
        with ``verify``: the reports) and assembled (``jobs.assembly``: written as they come, none
        kept), streamed (``live``: each chunk; with silences removed, the audio as the removal makes
        it final), its words aligned (``words``) and reported as each is done. The stream's steps
        are staging too: an HTTP flac is written to a temp file until it is complete."""
        chunks_done = joined_samples = 0  # chunks joined so far, and their joined length

        def send(pieces: list) -> None:
            for piece in pieces:
                clock.timings.setdefault("first_audio_s", clock.since_start())
                on_audio(piece)

        async def chunk_done(wave: np.ndarray, encoded: object | None = None) -> None:
            nonlocal chunks_done, joined_samples
            index, chunks_done = chunks_done, chunks_done + 1
            # before any encoder or file sees it
            audio.check_finite(wave, index, len(plan.items), seed_given=job.seed is not None, verified=job.verify)
            joined_samples = audio.joined_after(joined_samples, len(wave), SAMPLE_RATE, job.cross_fade_duration)
            if live:
                send(await self._staging(stream.add, wave))
            await self._staging(assembly.add, wave)  # while the model samples the next chunks
            if words is not None:
                with clock.step("alignment_s"):
                    assembly.add_words(index, *await words.align(index, wave, encoded))
            if stream is not None and not live:  # silences removed: the audio as it is final
                send(await self._staging(stream.add_joined, assembly.take_kept()))
            if on_progress is not None and len(plan.items) > 1:
                on_progress({"chunks_done": chunks_done, "chunks_total": len(plan.items),
                             "audio_seconds": round(joined_samples / SAMPLE_RATE, 3)})

        try:
            reports = None
            with clock.step("synthesis_s"):
                if job.verify:
                    reports = await self._guard(job, plan, clock).run(plan.items, plan.texts, chunk_done)
                else:
                    await self._sample(plan.items, chunk_done, first_alone=live)
            with clock.step("encoding_s"):  # what is left once the last chunk is in
                assembled = await self._end_audio(assembly, plan.texts, stream, send, live=live)
        except BaseException:
            assembly.abandon()  # no thread uses it now (_off_loop waits for its thread)
            raise
        return assembled, reports

    async def _end_audio(self, assembly: AudioAssembly, texts: list[str], stream: streaming.LiveAudio | None,
                         send: Callable[[list], None], *, live: bool) -> Assembled:
        """The audio's end written and streamed: a stream of a job whose silences are removed gets
        it a piece at a time (a silent output is read back from disk, never gathered whole)."""
        if stream is not None and not live:
            ending = assembly.finish()
            while await self._staging(next, ending, False):
                send(await self._staging(stream.add_joined, assembly.take_kept()))
        assembled = await self._staging(assembly.close, texts)
        if stream is not None:
            if not live:
                send(await self._staging(stream.add_joined, assembly.take_kept()))
            send(await self._staging(stream.close))
        return assembled

    async def _whisper_for_options(self, job: TTSInput, clock: JobClock) -> None:
        """``verify``, ``timestamps`` and ``subtitles`` need the worker's Whisper: a job asking for
        them is refused before any model call when the worker has none or cannot load it. The wait
        is ``whisper_load_s``, not synthesis: the first such job after a start loads the model."""
        options = [(name, verb) for name, verb, asked in (("'timestamps' and 'subtitles'", "need", job.aligned),
                                                          ("'verify'", "needs", job.verify)) if asked]
        if not options:
            return
        if self.transcriber is None:
            name, verb = options[0]
            raise InputError(f"{name} {verb} the worker's transcription model, and this worker has none.")
        with clock.step("whisper_load_s"):
            await self._whisper_for(f"Leave out {' and '.join(name for name, _ in options)}, or set "
                                    f"{ENV_ASR_MODEL} to a Whisper model this worker can load.")

    def _guard(self, job: TTSInput, plan: JobPlan, clock: JobClock) -> GuardedSampling:
        """The job's guarded sampling (``jobs.verify``): its chunks in windows of the batcher's job
        window, each transcribed by the worker's Whisper on the model thread (``verify_s``; the
        model is loaded by then, ``_whisper_for_options``)."""
        async def transcribe(wave: np.ndarray, language: str) -> Heard:  # word-timed: the encoder's output is kept
            with clock.step("verify_s"):
                return await self._on_gpu_thread(functools.partial(self.transcriber.hear, keep=job.aligned,
                                                                   language=language), wave, SAMPLE_RATE)

        clock.timings.setdefault("verify_s", 0.0)  # also when no try got as far as its transcription
        asked = {"max_error": job.verify_max_error, "retries": job.verify_retries}
        options = GuardOptions(language=self.models.registry[plan.items[0].model].language,
                               **{knob: value for knob, value in asked.items() if value is not None})
        timeout = self.settings.job_timeout_s
        return GuardedSampling(self.batcher, transcribe, options=options, window=self.batcher.job_window,
                               max_seed=MAX_SEED, time_left=(lambda: timeout - clock.since_start()) if timeout else None)

    def _chunk_words(self, job: TTSInput, plan: JobPlan) -> ChunkWords | None:
        """The job's word alignment, when its word times or subtitles are asked for."""
        if not job.aligned:
            return None
        return ChunkWords(self.transcriber, plan.texts, self.models.registry[plan.items[0].model].language,
                          spaced=plan.spaced, on_model_thread=self._on_gpu_thread, off_loop=self._off_loop)

    def _inline_decision(self, delivery: Delivery, result: dict, size: int) -> InlineAudio:
        """Whether the audio goes back inline. By default only where the result URL is a path on this
        machine (local storage); a streamed job's output also holds every piece it sent (runpod
        keeps them all), which the room leaves out. Settled before the uploads, so the room keeps
        space for the widest ``subtitles_error`` they can still add."""
        job, stream = delivery.job, delivery.stream
        wanted = job.return_base64 if job.return_base64 is not None else not self.storage.result_urls_reach_callers
        limit = self.settings.max_result_bytes - (stream.result_bytes if stream is not None else 0)
        error = widest_subtitles_error(result.get("subtitles_key"),
                                       older_subtitles_keys(delivery.output_key, delivery.fmt, job))
        widest = result if error is None else {**result, "subtitles_error": error}
        room = encoding.inline_room(widest, limit) if wanted else 0
        return InlineAudio(wanted=wanted, room=room, too_large=wanted and size > room)

    async def _attach_inline(self, job_id: str, result: dict, inline: InlineAudio, staging: Path, size: int) -> None:
        if inline.too_large:  # the local-storage default: the stored file only, and why
            result["audio_base64_omitted"] = encoding.omitted_sentence(size, inline.room)
            log.warning("job %s: audio of %d bytes too large to return inline", job_id, size)
        elif inline.wanted:
            data = await self._staging(staging.read_bytes)
            result["audio_base64"] = await self._off_loop(encoding.to_base64, data)

    async def _sample(self, items: list, chunk_done: Callable[[np.ndarray], Awaitable[None]], *,
                      first_alone: bool) -> None:
        """``chunk_done`` runs for each item's waveform, in order, as soon as it and those before it
        are sampled; none is kept after. The job queues only the batcher's ``job_window`` items
        ahead at a time, so its memory does not grow with its text and a job arriving meanwhile
        waits for one model call of it, not for all its chunks. With ``first_alone`` the first
        item is queued by itself, so it is never held up by a model call of the longer ones.
        (The sampler seeds each item itself: how items are grouped never changes their audio.)"""
        turn = JobTurn()
        queued: collections.deque[asyncio.Future] = collections.deque()
        queued_up_to = 0
        try:
            for done in range(len(items)):
                # The next window once every queued item is sampled, so that it goes in one call
                # (topped up one item at a time, each would get a call of its own).
                if all(future.done() for future in queued):
                    window = 1 if first_alone and done == 0 else self.batcher.job_window
                    more = items[queued_up_to:queued_up_to + window]
                    queued_up_to += len(more)
                    turn.work_after = sum(map(item_work, items[queued_up_to:]))
                    queued.extend(self.batcher.enqueue(more, turn))
                wave = await self.batcher.sampled(queued[0])
                queued.popleft()
                await chunk_done(wave)
        finally:
            self.batcher.withdraw(list(queued))  # a failed or cancelled job leaves the queue

    async def _widest_fields(self, job_id: str, job: TTSInput, fmt: encoding.OutputFormat, voice_names: list[str],
                             plan: JobPlan, stream: streaming.LiveAudio | None, normalized: dict | None, *,
                             store: bool) -> int:
        """The most bytes the job's result fields take besides its segments (``jobs.results``),
        from its real keys and URLs."""
        key = output_key_for(job_id, job.output_key, fmt) if store else None
        urls, subtitles_key = {}, None
        if key is not None:
            urls["audio"] = await self._off_loop(self.storage.result_url, key)
            if job.subtitles is not None:
                subtitles_key = subtitles_key_for(key, fmt, job.subtitles)
                urls["subtitles"] = await self._off_loop(self.storage.result_url, subtitles_key)
        return widest_result_bytes(
            job, voice_names=voice_names, model=plan.items[0].model, chunks=len(plan.items), fmt=fmt, urls=urls,
            output_key=key, subtitles_key=subtitles_key, stream=stream,
            older_keys=older_subtitles_keys(key, fmt, job) if key is not None else [],
            extras={"normalized": normalized} if normalized is not None else {},
            inline_by_default=store and job.return_base64 is None and not self.storage.result_urls_reach_callers)

    def _refuse_early(self, plan, fmt: encoding.OutputFormat, job: TTSInput,
                      stream: streaming.LiveAudio | None, *, fields_bytes: int) -> None:
        """Refuse before any model call what cannot fit in the job's RunPod result: its fields
        (``fields_bytes`` at their widest, and its segments), a streamed job's pieces (runpod keeps
        them all in its output), then ``return_base64``'s file beside them. The length is known
        from the plan, and so are the pieces' size and a WAV's (compressed sizes are known only
        once encoded, and removed silences, never streamed, make the audio shorter than planned)."""
        # Every result holds its segments (each chunk's verdict with verify, its words with
        # timestamps): known from the plan.
        fields = fields_bytes + planned_segments_bytes(plan.texts, verified=job.verify,
                                                       words=job.timestamps is not None)
        limit = self.settings.max_result_bytes - fields
        if limit < encoding.RESULT_ALLOWANCE_BYTES:
            instead = ", or ask for 'subtitles' instead of 'timestamps'" if job.timestamps is not None else ""
            raise InputError(f"The result's segments and other fields for this text could take {fields} bytes, "
                             f"more than a job's result may hold ({self.settings.max_result_bytes}); "
                             f"split the text{instead}.")
        if job.remove_silence:
            return
        if stream is not None:
            pieces = stream.planned_result_bytes(planned_samples(plan), len(plan.items))
            if pieces > limit - encoding.RESULT_ALLOWANCE_BYTES:
                raise InputError(streaming.too_long_sentence(self.settings.max_result_bytes - limit + pieces,
                                                             self.settings.max_result_bytes))
            limit -= pieces
        if not job.return_base64:
            return
        least = fmt.least_bytes(least_output_length(planned_samples(plan), job.sample_rate))
        room = encoding.inline_room({}, limit)  # more than any real result leaves
        if least > room:
            raise InputError(encoding.too_large_sentence(fmt, least, room, before=True))

    async def _voice(self, name: str, given: str | None, staging: Path,
                     timings: dict[str, float]) -> JobVoice:
        """Voice ``name`` (staged through ``staging``), its transcript and where that came from,
        with the time taken added to ``timings``."""
        mark = time.perf_counter()
        voice = await self._staging(self.voices.fetch, name, staging)
        fetched = time.perf_counter()
        ref_text, source = await self._ref_text(voice, given)
        # Looking up a stored transcript is part of fetching the voice; Whisper is its own step.
        looked_up = time.perf_counter() - fetched
        timings["download_s"] += fetched - mark + (0.0 if source == TRANSCRIBED else looked_up)
        timings["transcription_s"] += looked_up if source == TRANSCRIBED else 0.0
        return JobVoice(voice, ref_text, source)

    async def _ref_text(self, voice: Voice, given: str | None) -> tuple[str, str]:
        known = await self._off_loop(self.voices.known_ref_text, voice, given)
        if known:
            return known
        # Jobs that arrive together for one untranscribed voice share one transcription.
        running = self._transcriptions.get(voice.identity)
        if running is None:
            running = asyncio.ensure_future(self._transcribe_and_remember(voice))
            self._transcriptions[voice.identity] = running
            running.add_done_callback(lambda _: self._transcriptions.pop(voice.identity, None))
        return await asyncio.shield(running), TRANSCRIBED

    async def _transcribe_and_remember(self, voice: Voice) -> str:
        text = await self._transcribe_off_the_clock(voice.used, voice.sr)
        await self._off_loop(self.voices.remember_transcript, voice, text)
        return text

    async def _transcribe_off_the_clock(self, samples, sr) -> str:
        """Whisper is resolved, downloaded if need be and loaded off the model thread; only the
        transcription itself runs there, between model calls."""
        if self.transcriber is not None:
            await self._whisper_for("Pass ref_text or store a transcript beside the voice.")
        self.transcriptions += 1
        return await self._on_gpu_thread(self.voices.transcribe, samples, sr)

    async def _whisper_for(self, instead: str) -> None:
        """The worker's Whisper resolved and loaded (off the model thread), before any model call
        of the job that needs it; one that cannot be loaded is refused with what the job can do
        ``instead``."""
        try:
            await self._off_loop(self.transcriber.load)
        except StorageError as err:
            raise ModelUnavailable(f"{err} {instead}") from err

    async def _off_loop(self, fn, *args):
        """``fn(*args)`` on the I/O threads. A thread cannot be stopped: if the job is cancelled (its
        deadline, a shutdown) meanwhile, the job still waits for the thread before it unwinds, so its
        temp files are removed after the thread's last write, never before."""
        return await outlast(asyncio.get_running_loop().run_in_executor(self.io_threads, functools.partial(fn, *args)))

    async def _commit(self, fn, *args):
        """The job's one write that changes what a caller sees (the output, or the voice). Once it
        has begun the job is seen through to its real end: the deadline no longer turns it into an
        error over a change that was made (``jobs.guard.JobGuard`` waits for a committing job)."""
        COMMITTING.setdefault(asyncio.current_task(), threading.Event())
        if asyncio.iscoroutinefunction(fn):
            return await fn(*args)
        return await self._off_loop(fn, *args)

    async def _staging(self, fn, *args):
        """``fn`` run off the event loop, with a failure of the temp folder said as such (libsndfile
        reports a full disk as its own error type)."""
        try:
            return await self._off_loop(fn, *args)
        except WorkerError:
            raise
        except (OSError, sf.LibsndfileError) as err:
            raise staging_error(self.settings.tmp_dir, err) from err

    @one_job
    async def upload(self, job_id: str, job: UploadInput) -> dict:
        started = time.perf_counter()
        with job_files(self.settings.tmp_dir, job_id) as paths:
            if job.voice_file_url is not None:
                size = await self._staging(functools.partial(
                    download_to_file, job.voice_file_url, paths["download"],
                    max_bytes=self.settings.max_voice_bytes, allow_private=self.settings.allow_private_urls))
            elif job.voice_base64 is not None:
                size = await self._staging(self._save_base64, job.voice_base64, paths["download"])
            else:
                size = await self._staging(self._copy_incoming, job.voice_s3_key, paths["download"])
            samples, sr = await self._off_loop(audio.decode, paths["download"])
            duration = audio.duration_seconds(samples, sr)
            if duration < audio.REF_MIN_SECONDS or duration > audio.VOICE_MAX_SECONDS:
                raise InputError(f"The voice must be between {audio.REF_MIN_SECONDS:g} and "
                                 f"{audio.VOICE_MAX_SECONDS:g} seconds long (it is {duration:.1f} s).")
            # Stored is the part synthesis uses, prepared once, and the transcript describes exactly that part.
            clip, clipped, gain = await self._off_loop(prepare_upload, samples, sr, TARGET_RMS)
            sr = SAMPLE_RATE
            if job.ref_text and clipped:
                raise clipped_refusal(duration)
            ref_text = job.ref_text or await self._transcribe_off_the_clock(clip, sr)
            key = await self._commit(self._staging, self.voices.store, job.voice_name, clip, sr, ref_text,
                                    paths["voice.wav"])
        timings = {"total_s": time.perf_counter() - started}
        stored_seconds = audio.duration_seconds(clip, sr)
        await self.record(job_id, "upload", "ok", voice=job.voice_name, source=job.source, input_bytes=size,
                          audio_seconds=round(stored_seconds, 3), gain=round(gain, 3), timings=_rounded(timings))
        return {"voice_name": job.voice_name, "voice_key": key, "duration": round(stored_seconds, 3),
                "source_duration": round(duration, 3), "sample_rate": sr, "ref_text": ref_text}

    def _save_base64(self, text: str, dest: Path) -> int:
        data = decode_base64_voice(text, self.settings.max_voice_bytes)
        dest.write_bytes(data)
        return len(data)

    def _copy_incoming(self, ref: str, dest: Path) -> int:
        key = incoming_key(ref, self.settings.s3_bucket)
        try:
            self.storage.download_file(key, dest, max_bytes=self.settings.max_voice_bytes)
        except KeyNotFound:
            raise InputError(f"'voice_s3_key' names '{shown(key, SHOWN_KEY_CHARS)}', which is not in storage.") from None
        except ObjectTooLarge as err:
            raise InputError(f"'{shown(key, SHOWN_KEY_CHARS)}' is {err.size} bytes, more than the {err.limit} allowed "
                             f"({ENV_MAX_VOICE_BYTES}).") from None
        return dest.stat().st_size

    @one_job
    async def list_voices(self, job_id: str, job: ListVoicesInput) -> dict:
        started = time.perf_counter()
        voices, next_cursor = await self._off_loop(self.voices.list_page, job.limit, job.cursor, job.details)
        timings = {"total_s": time.perf_counter() - started}
        await self.record(job_id, "list_voices", "ok", voices=len(voices), timings=_rounded(timings))
        return {"voices": voices, "next_cursor": next_cursor}

    @one_job
    async def list_models(self, job_id: str, job: ListModelsInput) -> dict:
        started = time.perf_counter()
        models = await self._off_loop(self.models.describe)
        timings = {"total_s": time.perf_counter() - started}
        await self.record(job_id, "list_models", "ok", models=len(models), timings=_rounded(timings))
        return {"models": models, "default": self.models.pool.default}

    @one_job
    async def voice_info(self, job_id: str, job: VoiceInfoInput) -> dict:
        started = time.perf_counter()
        with job_files(self.settings.tmp_dir, job_id) as paths:
            info = await self._staging(self.voices.info, job.voice_name, paths["voice.wav"])
        timings = {"total_s": time.perf_counter() - started}
        await self.record(job_id, "voice_info", "ok", voice=job.voice_name, timings=_rounded(timings))
        return info

    @one_job
    async def delete_voice(self, job_id: str, job: DeleteVoiceInput) -> dict:
        started = time.perf_counter()
        await self._off_loop(self.voices.require_stored, job.voice_name)
        removed = await self._commit(self.voices.delete, job.voice_name)
        timings = {"total_s": time.perf_counter() - started}
        await self.record(job_id, "delete_voice", "ok", voice=job.voice_name, timings=_rounded(timings))
        return {"voice_name": job.voice_name, "deleted_keys": removed}

    async def record(self, job_id: str, endpoint: str, status: str, **fields) -> None:
        """The job's log record, then the retention sweep; a failure of the record is logged (one
        line; a traceback only for an unexpected one), never raised over the result."""
        entry = {"job_id": job_id, "endpoint": endpoint, "status": status,
                 "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
        try:
            await self._off_loop(self.storage.put_json, f"{LOGS_PREFIX}{job_id}.json", entry)
        except StorageError as err:  # its sentence names the cause: one line, not the exception chain
            log.warning("could not write the log record of job %s: %s", job_id, err)
        except Exception:  # a bug: its traceback is the lead
            log.warning("could not write the log record of job %s", job_id, exc_info=True)
        # Local storage keeps outputs and records only as long as F5_LOCAL_RETENTION_HOURS says
        # (rate-limited inside; S3 buckets use lifecycle rules instead).
        await self._off_loop(self.storage.sweep_expired)


def _job_fields(voices: dict[str, JobVoice], plan: JobPlan) -> dict:
    """What ``tts_result`` takes of a job's voices and plan."""
    return {"voice_names": list(voices), "ref_text_source": next(iter(voices.values())).ref_text_source,
            "model": plan.items[0].model, "chunks": len(plan.items)}


def _verification(assembled: Assembled, reports: list[ChunkReport] | None) -> dict | None:
    """A verified job's reports in its segments (each chunk's), and the result's ``verify``."""
    if reports is None:
        return None
    for segment, report in zip(assembled.segments, reports):
        segment["verify"] = report.as_result()
    return job_summary(reports)


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in timings.items()}
