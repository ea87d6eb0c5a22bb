"""Word times (``"timestamps": "word"``) and subtitle files (``"subtitles": "srt"|"vtt"``).

The alignment's parts are checked against references (openai-whisper's cell-by-cell DTW, a
numpy median), then run through the worker's real Whisper path on the tiny random Whisper: its
attention is noise, so the times it gives are arbitrary, but the path is monotonic by construction
and the tests assert what must hold whatever the model heard: one time per word of the text,
monotonic, inside its segment, inside the audio. The cue rules are checked on word times of
real speech's pace (three words a second) and on the job's own, in files read back by the ``srt``
and ``webvtt-py`` libraries.
"""
from __future__ import annotations

import asyncio
import contextlib
import html
import io
import time

import numpy as np
import pytest
import soundfile as sf
import srt
import torch
import webvtt

from f5worker.errors import InputError, StorageError
from f5worker.inference.alignment import (align_words, alignment_heads, dtw_path, median_filter, prompt_ids,
                                          token_room, word_times)
from f5worker.inference.transcriber import Transcriber
from f5worker.jobs.inputs import MAX_OUTPUT_KEY_CHARS, parse_job_input
from f5worker.jobs.subtitles import (CLAUSE_END, LINE_CELLS, MAX_CUE_SECONDS, MIN_CUE_SECONDS, SENTENCE_END,
                                     TimedWord, build_cues, cells, fits, line_wide, render)
from f5worker.jobs.chunking import chunk_for_model, spaced_starts
from f5worker.jobs.plan import chunks_with_short_first
from f5worker.jobs.results import (MAX_REASON_BYTES, added_sentence, brief_reason, json_bytes, not_removed_sentence,
                                   not_stored_sentence, widest_subtitles_error)
from f5worker.jobs.word_times import ChunkWords
from f5worker.jobs.words import split_words
from f5worker.settings import RUNSYNC_RESULT_BYTES, Settings
from tests.fixtures_whisper import write_tiny_whisper
from tests.fixtures_worker import worker_ctx
from tests.helpers import Recorder, pcm_of, result_bytes, smallest_accepted


# --- the alignment's parts -------------------------------------------------------------------------
def dtw_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """openai-whisper's ``dtw_cpu`` and ``backtrace`` (whisper/timing.py), cell by cell."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf)
    trace = -np.ones((n + 1, m + 1))
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j], trace[i, j] = x[i - 1, j - 1] + c, t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        i, j = (i - 1, j - 1) if trace[i, j] == 0 else (i - 1, j) if trace[i, j] == 1 else (i, j - 1)
    cells_ = np.array(path[::-1])
    return cells_[:, 0], cells_[:, 1]


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (3, 9), (20, 60), (60, 20), (8, 8)])
def test_dtw_equals_openai_whispers(shape):
    rng = np.random.default_rng(sum(shape))
    for x in (rng.normal(size=shape), rng.integers(0, 2, size=shape).astype(float)):  # the second: ties
        ours, theirs = dtw_path(x), dtw_reference(x)
        assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])


def test_word_times_follow_the_attention():
    """Token r looks at frames 10r..10r+9 (and away from the rest): each word starts where its
    first token's frames do."""
    tokens, frames = 5, 60
    matrix = -np.ones((tokens + 1, frames))
    for r in range(tokens + 1):
        matrix[r, 10 * r:10 * r + 10] = 1.0
    times = word_times(matrix, [2, 1, 2])  # words of 2, 1 and 2 tokens
    assert times == [(0.0, 0.4), (0.4, 0.6), (0.6, 1.0)]


def test_median_filter_equals_numpys():
    x = torch.randn(2, 3, 40)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (3, 3)), mode="reflect")
    expected = np.median(np.lib.stride_tricks.sliding_window_view(padded, 7, axis=-1), axis=-1)
    assert np.allclose(median_filter(x, 7).numpy(), expected)
    assert torch.equal(median_filter(x[..., :3], 7), x[..., :3])  # too short to filter


def test_words_are_the_texts_own():
    words = split_words("Hello, world! 你好，世界。 It's 3.5 m.")
    assert [w.text for w in words] == ["Hello,", "world!", "你", "好，", "世", "界。", "It's", "3.5", "m."]
    assert [w.as_said for w in words][:3] == [" Hello,", " world!", "你"]
    # Opening brackets go with the word after them; Thai is split into graphemes, marks kept.
    assert [w.text for w in split_words("「你好」。(yes)")] == ["「你", "好」。", "(yes)"]
    assert [w.text for w in split_words("สวัสดี ครับ")] == ["ส", "วั", "ส", "ดี", "ค", "รั", "บ"]
    assert cells("สวัสดี") == 4 and cells("你好") == 4 and cells("café") == 4


@pytest.fixture(scope="module")
def whisper_folder(tmp_path_factory):
    return write_tiny_whisper(tmp_path_factory.mktemp("aligning-whisper"))


@pytest.fixture(scope="module")
def transcriber(whisper_folder):
    return Transcriber(Settings.from_env({"ASR_MODEL": str(whisper_folder)}), device="cpu")


def test_alignment_through_the_worker_whisper(transcriber):
    words = [w.as_said for w in split_words("Hello there, world. This is a test of the aligner.")]
    audio = (0.1 * np.random.default_rng(0).standard_normal(24000 * 4)).astype(np.float32)
    spans = transcriber.align(audio, 24000, words, "en")
    assert len(spans) == len(words)
    flat = [t for span in spans for t in span]
    assert flat == sorted(flat) and 0.0 <= flat[0] and flat[-1] <= 4.0
    model = transcriber.load().model
    assert model.config._attn_implementation == "sdpa"  # back to what it was after the eager pass
    # The tiny model lists no alignment heads: every head of the decoder's second half.
    assert alignment_heads(model) == [(0, 0), (0, 1)]
    assert transcriber.alignment_tokens([words, words[:2]], ["en", "zh"]) == [
        (sum(len(w.encode()) for w in words), 448 - 5), (sum(len(w.encode()) for w in words[:2]), 448 - 5)]
    assert transcriber.align(audio, 24000, [], "en") == []


def test_the_checkpoints_own_heads_and_language_are_used(transcriber):
    pipe = transcriber.load()
    pipe.model.generation_config.alignment_heads = [[0, 1]]
    try:
        assert alignment_heads(pipe.model) == [(0, 1)]
    finally:
        del pipe.model.generation_config.alignment_heads
    tok = pipe.tokenizer
    assert prompt_ids(tok, "zh")[1] == tok.convert_tokens_to_ids("<|zh|>")
    assert len(prompt_ids(tok, "not-a-language")) == 3  # a language the model lacks: left out
    assert token_room(pipe.model, tok, "en") == 448 - 5
    audio = np.zeros(16000, dtype=np.float32)
    spans = align_words(pipe.model, tok, pipe.feature_extractor, audio, ["你", "好"], "zh")
    assert len(spans) == 2 and spans[0][0] <= spans[1][0] <= spans[1][1] <= 1.0


# --- the cue rules ---------------------------------------------------------------------------------
SPEECH = ("Chapter one. It was a bright cold day in April, and the clocks were striking thirteen. "
          "Winston Smith, his chin nuzzled into his breast in an effort to escape the vile wind, slipped "
          "quickly through the glass doors of Victory Mansions, though not quickly enough to prevent a swirl "
          "of gritty dust from entering along with him. Yes. No. The hallway smelt of boiled cabbage and old "
          "rag mats; at one end of it a coloured poster, too large for indoor display, had been tacked to the "
          "wall. Averylongwordthatdoesnotfitinanylineofasubtitleatallbecauseitgoeson and then it ends.")


def paced(text: str, words_per_second: float = 3.0) -> list[TimedWord]:
    step = 1 / words_per_second
    return [TimedWord(w, round(k * step, 3), round((k + 1) * step, 3)) for k, w in enumerate(split_words(text))]


def cue_word_counts(parsed, words: list[TimedWord]) -> list[int]:
    """How many of ``words`` each cue holds, read off its text (spaces aside): every word once, in order."""
    counts, position = [], 0
    for _, _, lines in parsed:
        text, count = "".join(lines).replace(" ", ""), 0
        while text:
            assert text.startswith(words[position + count].word.text), (text, words[position + count])
            text = text[len(words[position + count].word.text):]
            count += 1
        counts.append(count)
        position += count
    assert position == len(words)
    return counts


def assert_cue_rules(parsed: list[tuple[float, float, list[str]]], words: list[TimedWord], duration: float):
    """Cues in order, apart, inside the audio; two lines of 42 cells at most; up for at least a
    second (the last may end with the audio); breaks at sentence ends, clause ends, or where the
    next word does not fit; every word once (a word wider than a line as its line-wide pieces)."""
    words = [piece for word in words for piece in line_wide(word)]
    counts = cue_word_counts(parsed, words)
    for start, end, lines in parsed:
        assert 0 <= start < end <= duration + 1e-9
        assert len(lines) <= 2 and all(cells(line) <= LINE_CELLS for line in lines), lines
        assert end - start >= MIN_CUE_SECONDS - 1e-3 or end == pytest.approx(duration), (start, end, lines)
        assert end - start <= MAX_CUE_SECONDS + 1e-3, (start, end, lines)
    for (_, end, _), (start, _, _) in zip(parsed, parsed[1:]):
        assert end <= start + 1e-9
    position = 0
    for k, count in enumerate(counts[:-1]):
        last, after = words[position + count - 1], words[position + count]
        cue_words = [w.word for w in words[position:position + count]]
        closes = (SENTENCE_END.search(last.word.text) or CLAUSE_END.search(last.word.text)
                  or not fits(cue_words + [after.word]) or after.end - words[position].start > MAX_CUE_SECONDS)
        assert closes, (k, parsed[k])
        position += count


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_cues_follow_broadcast_practice(fmt):
    words = paced(SPEECH)
    duration = words[-1].end + 0.5
    text = render(build_cues(words, duration), fmt)
    parsed = parse(text, fmt)
    assert len(parsed) > 8
    assert_cue_rules(parsed, words, duration)
    # "Chapter one." is said in 0.67 s, too short a cue: it shares one, its own line the first
    # (lines break at a sentence end where both fit); the next cue ends at its sentence's end,
    # the one after at a clause end.
    assert parsed[0][2] == ["Chapter one.", "It was a bright cold day in April,"]
    assert parsed[1][2] == ["and the clocks were striking thirteen."]
    assert parsed[3][2][-1].endswith("Mansions,")
    assert any(len(lines) == 2 for _, _, lines in parsed)


def test_cues_of_unspaced_text_count_wide_characters_twice():
    words = paced("今天天气很好，我们去公园散步吧。然后我们一起吃午饭，再回家休息一下，晚上看一部电影。", 5)
    parsed = parse(render(build_cues(words, words[-1].end), "srt"), "srt")
    assert all(cells(line) <= LINE_CELLS for _, _, lines in parsed for line in lines)
    assert_cue_rules(parsed, words, words[-1].end)


@pytest.mark.parametrize("text, first_cue_ends_with", [
    ("यह पहला वाक्य है। यहाँ दूसरा वाक्य है, जो थोड़ी देर और चलता है। और फिर तीसरा वाक्य आता है।", "है।"),  # the danda
    ("هذه هي الجملة الأولى؟ وهنا الجملة الثانية، التي تستمر لفترة أطول قليلا. ثم تأتي جملة ثالثة هنا.", "الأولى؟"),
])
def test_a_cue_ends_at_a_sentence_end_in_every_script_the_chunker_knows(text, first_cue_ends_with):
    """The first sentence lasts 1.33 s (four words at three a second), as "This is the first
    sentence." does, whose cue ends there; in Hindi and Arabic the cue had run on (their full stops
    were not the subtitles' own, only the chunker's)."""
    assert build_cues(paced("This is the first sentence. Here is the second one."), 4.0)[0].words[-1].word.text \
        == "sentence."
    words = paced(text)
    assert [w.word.text for w in words].index(first_cue_ends_with) == 3
    assert len(build_cues(words, words[-1].end)[0].words) == 4


def test_lines_break_at_a_clause_end_in_arabic_as_in_english():
    assert build_cues(paced("Here is the second one, which goes on for a while longer."), 4.0)[0].lines[0] \
        .endswith("one,")
    words = paced("وهنا الجملة الثانية، التي تستمر لفترة أطول قليلا وبعد ذلك.")
    cues = build_cues(words, words[-1].end)
    assert len(cues) == 1 and cues[0].lines[0].endswith("الثانية،"), cues[0].lines


@pytest.mark.parametrize("text, chunker, first", [
    ("はい。10時に駅の前で会いましょう。", lambda t: chunks_with_short_first(t, 100), "はい。"),  # no space in the text
    ("Yes, I agree. 你好，我的朋友。", lambda t: chunk_for_model(t, 20), "Yes, I agree."),  # a space in the text
])
def test_a_cue_across_a_chunk_boundary_reads_as_the_text(text, chunker, first):
    """The space between two chunks' words is the text's (``JobPlan.spaced``), not guessed from
    their script ("はい。 10時" and "Yes, I agree.你好" were what the cue showed)."""
    chunks = chunker(text)
    assert chunks[0] == first and len(chunks) >= 2, chunks
    spaced = [None] + spaced_starts(text, chunks)[1:]  # as plan() gives it
    words = ChunkWords(None, chunks, "ja", spaced=spaced, on_model_thread=None, off_loop=None).words
    timed = [TimedWord(w, k * 0.1, (k + 1) * 0.1) for k, w in enumerate(w for chunk in words for w in chunk)]
    cues = build_cues(timed, timed[-1].end)
    assert "".join(line for cue in cues for line in cue.lines) == text, [c.lines for c in cues]


def test_a_burst_of_short_cues_is_held_a_second_each():
    """Sentences said in 0.2 s each (as a random model's times may be): merged where they fit,
    held and pushed back so that none is up for less than a second while the audio lasts."""
    words = paced(" ".join(f"Word{k}." for k in range(40)), 20)
    parsed = parse(render(build_cues(words, 30.0), "vtt"), "vtt")
    assert_cue_rules(parsed, words, 30.0)


def test_vtt_cue_text_is_written_as_text_not_markup():
    """WebVTT reads cue text as markup: what the job's text says shows as written, and "-->" in it
    cannot end the cue (webvtt-py refused to write it, after the whole job had been sampled)."""
    words = paced("If a<b and c&d then go. <b>Bold</b> words here. Press the code --> now, then wait.")
    cues = build_cues(words, words[-1].end)
    text = render(cues, "vtt")
    captions = webvtt.from_string(text).captions
    assert [html.unescape(line) for c in captions for line in c.lines] == [line for c in cues for line in c.lines]
    assert not any(mark in c.text for c in captions for mark in ("<", ">", "-->"))
    assert "&lt;b&gt;Bold&lt;/b&gt;" in text and "c&amp;d" in text


def test_srt_cue_text_cannot_add_a_cue_or_markup(tmp_path):
    """SRT has no escaping: a timing line in the job's text became a cue of its own in ffmpeg's
    reader (shown from 0 s for ten hours), and <font> and {\\an8} were rendered. Read back here by
    ffmpeg itself (PyAV), as players and burn-in tools read it."""
    import av

    words = paced("Hello there, this is fine. 00:00:00,000 --> 09:59:59,000 <font color=red>VISIT "
                  "EVIL DOT EXAMPLE</font> {\\an8}NOW. And that was all, folks.")
    cues = build_cues(words, words[-1].end + 0.5)
    text = render(cues, "srt")
    path = tmp_path / "cues.srt"
    path.write_text(text, encoding="utf-8")
    with av.open(str(path)) as container:
        stream = container.streams.subtitles[0]
        events = [(round(float(p.pts * stream.time_base), 3), bytes(p).decode("utf-8"))
                  for p in container.demux(stream) if p.pts is not None]
    assert [start for start, _ in events] == [cue.start for cue in cues]  # no cue the text made
    shown = [line.replace("\u2060", "") for _, event in events for line in event.splitlines()]
    assert shown == [line for cue in cues for line in cue.lines]  # the text as written, to the letter
    assert not any(mark in event for _, event in events for mark in ("-->", "<font", "{\\"))
    assert [line.replace("\u2060", "") for c in srt.parse(text) for line in c.content.splitlines()] == shown


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_a_word_wider_than_a_line_is_broken_across_lines_and_cues(fmt):
    long_word = "supercalifragilistic" * 15 + "."  # 301 letters, said over 16.6 s
    words = paced("It begins here.")
    words.append(TimedWord(split_words(long_word)[0], words[-1].end, words[-1].end + 16.6))
    words += [TimedWord(w.word, w.start + words[-1].end, w.end + words[-1].end) for w in paced("And it ends.")]
    duration = words[-1].end
    pieces = [piece for word in words for piece in line_wide(word)]
    assert len(pieces) == len(words) - 1 + 8 and "".join(p.word.text for p in pieces[3:11]) == long_word
    parsed = parse(render(build_cues(words, duration), fmt), fmt)
    assert all(cells(line) <= LINE_CELLS for _, _, lines in parsed for line in lines)
    assert all(end - start <= MAX_CUE_SECONDS for start, end, _ in parsed)
    assert_cue_rules(parsed, words, duration)


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_a_cue_is_not_up_through_a_long_pause(fmt):
    """An aligned word ends where the next begins: "Wait." before 12 s of silence is a 12 s word.
    Its cue is taken down after 7 s, not left up through the silence."""
    words = paced("It begins here. Wait.")
    words[-1] = TimedWord(words[-1].word, words[-1].start, words[-1].start + 12.0)
    words += [TimedWord(w.word, w.start + words[-1].end, w.end + words[-1].end) for w in paced("And it ends.")]
    duration = words[-1].end
    parsed = parse(render(build_cues(words, duration), fmt), fmt)
    waiting = next((start, end) for start, end, lines in parsed if "Wait." in " ".join(lines))
    assert waiting[1] - waiting[0] == pytest.approx(MAX_CUE_SECONDS, abs=1e-3), parsed
    assert_cue_rules(parsed, words, duration)


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_words_piled_at_the_end_keep_their_cues(fmt):
    """An aligner may put the last words on the audio's last frame: their cues start earlier
    rather than vanish (SRT's writer drops a cue that has no time)."""
    words = paced(SPEECH[:200]) + [TimedWord(w, 20.0, 20.0) for w in split_words(SPEECH[200:420])]
    cues = build_cues(words, 20.0)
    parsed = parse(render(cues, fmt), fmt)
    assert len(parsed) == len(cues) >= 4
    assert_cue_rules(parsed, words, 20.0)
    # Far more cues than the audio has seconds: they share it evenly, every word still in a cue.
    crowded = [TimedWord(w, 0.5, 0.5) for w in split_words(SPEECH)]
    parsed = parse(render(build_cues(crowded, 1.0), fmt), fmt)
    cue_word_counts(parsed, [piece for word in crowded for piece in line_wide(word)])
    assert all(start < end for start, end, _ in parsed) and parsed[-1][1] == 1.0
    assert build_cues(crowded, 0.0) == []  # no audio: nothing to show


def parse(text: str, fmt: str) -> list[tuple[float, float, list[str]]]:
    if fmt == "srt":
        return [(s.start.total_seconds(), s.end.total_seconds(), s.content.split("\n")) for s in srt.parse(text)]
    return [(c.start_in_seconds + int(c.start.split(".")[1]) / 1000, c.end_in_seconds + int(c.end.split(".")[1]) / 1000,
             c.lines) for c in webvtt.from_string(text).captions]


# --- inputs ----------------------------------------------------------------------------------------
def test_inputs():
    job = {"text": "Hi.", "local_voice": "basic_ref_en.wav"}
    parsed = parse_job_input({**job, "timestamps": "word", "subtitles": "vtt"})
    assert parsed.timestamps == "word" and parsed.subtitles == "vtt" and parsed.aligned
    assert not parse_job_input(job).aligned
    for bad, sentence in [({"timestamps": "char"}, "'timestamps' must be 'word'"),
                          ({"subtitles": "ass"}, "'subtitles' must be 'srt' or 'vtt'"),
                          ({"subtitles": True}, "'subtitles' must be a string"),
                          ({"output_key": "line.srt"}, "leave '.srt' off"),
                          ({"output_key": "film.vtt/line"}, "ends in '.vtt'")]:
        with pytest.raises(InputError, match=sentence):
            parse_job_input({**job, **bad})


# --- jobs ------------------------------------------------------------------------------------------
TEXT = ("The first sentence is here, and it goes on for a while. A second one follows it! "
        "Then a third sentence, with a clause; and another clause. 然后是中文。 " * 3 + "The end.")
JOB = {"text": TEXT, "local_voice": "basic_ref_en.wav", "nfe_step": 2, "seed": 5, "return_base64": False}


@pytest.fixture(scope="module")
def ctx(tiny_models, tiny_whisper, s3_server, tmp_path_factory):
    with worker_ctx(tiny_models, tiny_whisper, tmp_path_factory.mktemp("word-times"), s3_server) as built:
        yield built


def assert_words_in_segments(result: dict):
    times = []
    for segment in result["segments"]:
        assert [w["word"] for w in segment["words"]] == [w.text for w in split_words(segment["text"])]
        for word in segment["words"]:
            assert segment["start"] <= word["start"] <= word["end"] <= segment["end"]
            times += [word["start"], word["end"]]
    assert times == sorted(times) and times[-1] <= result["duration"]


@pytest.mark.parametrize("options", [{"subtitles": "srt"},
                                     {"subtitles": "vtt", "remove_silence": True, "sample_rate": 16000,
                                      "output_format": "flac", "output_key": "film/scene-1"},
                                     {"speed": 0.6, "cross_fade_duration": 0.0}])
def test_a_job_with_word_times_and_subtitles(ctx, options):
    _, result = ctx.run({**JOB, "timestamps": "word", **options})
    assert "error" not in result, result
    assert len(result["segments"]) >= 2
    assert_words_in_segments(result)
    assert "alignment_s" in result["timings"]
    fmt = options.get("subtitles")
    if fmt is None:
        assert "subtitles_url" not in result
        return
    key = result["output_key"].rsplit(".", 1)[0] + "." + fmt
    assert result["subtitles_key"] == key
    text = ctx.fetch_url(result["subtitles_url"]).decode("utf-8")
    assert ctx.get_bytes(key).decode("utf-8") == text
    words = [TimedWord(w, x["start"], x["end"]) for s in result["segments"]
             for w, x in zip(split_words(s["text"]), s["words"])]
    parsed = parse(text, fmt)
    assert parsed and parsed[0][0] == pytest.approx(words[0].start, abs=1e-3)
    audio, rate = sf.read(io.BytesIO(ctx.get_bytes(result["output_key"])))
    assert rate == result["sample_rate"] and len(audio) / rate == pytest.approx(result["duration"], abs=1e-3)
    assert_cue_rules(parsed, words, result["duration"])


def test_subtitles_alone_give_no_word_times_in_the_result(ctx):
    _, result = ctx.run({**JOB, "subtitles": "srt", "output_key": "alone"})
    assert "error" not in result, result
    assert all("words" not in s for s in result["segments"])
    assert result["subtitles_key"] == "output/alone.srt" and ctx.get_bytes("output/alone.srt")


def test_refused_before_any_model_call(ctx, whisper_folder, tmp_path, monkeypatch, limit):
    calls = len(ctx.worker.batcher.calls)
    monkeypatch.setattr(ctx.worker, "transcriber", None)
    _, result = ctx.run({**JOB, "timestamps": "word"})
    assert result["error"] == ("'timestamps' and 'subtitles' need the worker's transcription model, "
                               "and this worker has none.")
    short = write_tiny_whisper(tmp_path / "short-whisper", max_target_positions=16)
    monkeypatch.setattr(ctx.worker, "transcriber", Transcriber(Settings.from_env({"ASR_MODEL": str(short)}), "cpu"))
    _, result = ctx.run({**JOB, "subtitles": "vtt"})
    assert result["error"].startswith("Chunk 1 of the text takes ") and "more than the 11 one alignment" in \
        result["error"]
    monkeypatch.undo()
    limit(3000)
    _, result = ctx.run({**JOB, "timestamps": "word"})
    assert result["error"].startswith("The result's segments and other fields for this text could take ")
    assert len(ctx.worker.batcher.calls) == calls
    assert not ctx.tmp_files()


def test_a_job_accepted_at_the_smallest_result_limit_fits_it(ctx, limit):
    """A job is refused from its plan unless its whole result fits F5_MAX_RESULT_BYTES: its
    segments and every other field at their widest, the presigned URLs of a long output_key and
    the sentences its subtitle files may need among them. (Only the segments were counted, and a
    fixed 1 KiB for the rest, so such a job's result went past the limit it had been accepted at.)"""
    job = {**JOB, "text": "One short line, said once.", "subtitles": "srt", "timestamps": "word",
           "output_key": "book-7/" + "x" * (MAX_OUTPUT_KEY_CHARS - 7)}

    def accepts(max_result_bytes: int) -> bool:
        limit(max_result_bytes)
        result = ctx.run(job)[1]
        refusal = "The result's segments and other fields for this text could take "
        assert "error" not in result or result["error"].startswith(refusal), result
        return "error" not in result

    limit(RUNSYNC_RESULT_BYTES)
    whole = result_bytes(ctx.run(job)[1])
    least = smallest_accepted(accepts, 0, whole + 16_000)
    limit(least)
    size = result_bytes(ctx.run(job)[1])
    assert size <= least
    assert least - size < 4096, "refused with far more room than its widest result needs"
    assert not ctx.tmp_files()


@pytest.mark.parametrize("said", ["y" * 1000, '"' * 1000, "é" * 1000, "中" * 1000, "\x01" * 1000, "S3 put failed"])
def test_subtitles_error_is_bounded_by_its_widest(said):
    """A storage reason is cut to MAX_REASON_BYTES of the result as the result is measured (JSON,
    UTF-8: a quote or a control character is escaped, a CJK character is 3 bytes), so the widest
    ``subtitles_error`` the plan reserves room for holds any the job can get. (Cut by characters, a
    reason of '中' took 1,057 bytes where 457 were reserved.)"""
    reason = brief_reason(StorageError(said + "."))
    assert json_bytes(reason) <= MAX_REASON_BYTES
    assert reason == said if json_bytes(said) <= MAX_REASON_BYTES else reason.endswith("…")
    key, other = "output/a.srt", "output/a.vtt"
    got = added_sentence(not_stored_sentence(reason, key, removed=False), not_removed_sentence(other, reason))
    assert json_bytes(got) <= json_bytes(widest_subtitles_error(key, [other]))
    assert widest_subtitles_error(None, []) is None


def test_a_streamed_job_with_word_times_and_subtitles(ctx):
    """Each chunk is aligned once its audio is out: the stream is the stored audio, the words
    are in their segments, the subtitle file is stored."""
    *pieces, result = Recorder(ctx.worker).run({**JOB, "stream": True, "timestamps": "word", "subtitles": "vtt",
                                                "output_key": "streamed"})
    assert "error" not in result, result
    assert pieces and result["stream_chunks"] == len(pieces)
    stored, _ = sf.read(io.BytesIO(ctx.get_bytes(result["output_key"])), dtype="int16")
    np.testing.assert_array_equal(pcm_of(pieces), stored)
    assert_words_in_segments(result)
    assert result["subtitles_key"] == "output/streamed.vtt"
    assert webvtt.from_string(ctx.get_bytes("output/streamed.vtt").decode()).captions


def test_a_job_refused_at_its_end_stores_no_subtitles(ctx, limit):
    """A compressed file's size is known only once encoded: a job whose file is then too large to
    return inline is refused, and neither its audio nor its subtitle file is stored."""
    limit(60_000)
    _, result = ctx.run({**JOB, "subtitles": "srt", "output_format": "flac", "return_base64": True,
                         "output_key": "too-large"})
    assert result["error"].startswith("The flac audio is ") and "fit inline" in result["error"], result
    assert ctx.get_bytes("output/too-large.srt") is None and ctx.get_bytes("output/too-large.flac") is None


@contextlib.contextmanager
def put_fails(storage, suffix: str):
    """PutObject of a key ending in ``suffix`` fails before its request is built (a fault injected:
    the real server cannot be made to refuse one object), as a broken connection would."""
    def fail(params, **_):
        if params["Key"].endswith(suffix):
            raise ConnectionResetError(f"injected: the connection broke during the put of *{suffix}")

    with events_hook(storage, "before-parameter-build.s3.PutObject", fail):
        yield


def test_a_failed_audio_upload_leaves_the_older_pair_untouched(ctx):
    """The audio goes up first: its failure changes nothing (the subtitles used to go up first, so
    a failed audio upload left new subtitles beside the older audio)."""
    storage = ctx.worker.storage
    storage.put_text("output/pair.wav", "older audio")
    storage.put_text("output/pair.srt", "older subtitles")
    with put_fails(storage, ".wav"):
        _, result = ctx.run({**JOB, "subtitles": "srt", "output_key": "pair"})
    assert result["error"].endswith("(put output/pair.wav)."), result
    assert ctx.get_bytes("output/pair.wav") == b"older audio"
    assert ctx.get_bytes("output/pair.srt") == b"older subtitles"


def test_a_failed_subtitle_upload_still_answers_with_the_stored_audio(ctx):
    """The audio is stored (a change made: the answer is not an error); the result says why there
    is no subtitle file, and the older one of that key is gone, so none stands beside new audio."""
    storage = ctx.worker.storage
    storage.put_text("output/half.srt", "older subtitles")
    with put_fails(storage, ".srt"):
        _, result = ctx.run({**JOB, "subtitles": "srt", "output_key": "half"})
    assert "error" not in result, result
    assert "subtitles_url" not in result and "subtitles_key" not in result
    assert result["subtitles_error"].startswith("The audio was stored, but its subtitle file could not be (")
    assert result["subtitles_error"].endswith("(put output/half.srt)); no subtitle file is left at "
                                              "output/half.srt. Send the job again for both.")
    audio, rate = sf.read(io.BytesIO(ctx.get_bytes("output/half.wav")))
    assert len(audio) / rate == pytest.approx(result["duration"], abs=1e-3)
    assert ctx.get_bytes("output/half.srt") is None


@pytest.mark.parametrize("subtitles", [None, "vtt"])
def test_a_new_take_of_a_key_leaves_no_older_subtitle_file_beside_it(ctx, subtitles):
    """A take with an SRT file, then one of the same key without subtitles or with WebVTT: the
    older .srt stood beside audio it was not made for."""
    storage = ctx.worker.storage
    storage.put_text("output/take.srt", "older subtitles")
    _, result = ctx.run({**JOB, "output_key": "take", **({"subtitles": subtitles} if subtitles else {})})
    assert "error" not in result and "subtitles_error" not in result, result
    assert ctx.get_bytes("output/take.srt") is None
    assert (ctx.get_bytes("output/take.vtt") is not None) == (subtitles == "vtt")


def delete_fails(storage, suffix: str):
    """DeleteObject of a key ending in ``suffix`` fails (injected, as ``put_fails``)."""
    def fail(params, **_):
        if params["Key"].endswith(suffix):
            raise ConnectionResetError(f"injected: the connection broke during the delete of *{suffix}")
    return events_hook(storage, "before-parameter-build.s3.DeleteObject", fail)


@contextlib.contextmanager
def events_hook(storage, event: str, hook):
    storage.client.meta.events.register(event, hook)
    try:
        yield
    finally:
        storage.client.meta.events.unregister(event, hook)


def test_an_older_subtitle_file_that_cannot_be_removed_is_said(ctx):
    storage = ctx.worker.storage
    storage.put_text("output/kept.vtt", "older subtitles")
    with delete_fails(storage, ".vtt"):
        _, result = ctx.run({**JOB, "output_key": "kept"})
    assert "error" not in result, result
    assert result["subtitles_error"].startswith("An older subtitle file at output/kept.vtt could not be removed (")
    assert result["subtitles_error"].endswith("); it was not made for this audio.")
    # beside a subtitle file of its own that could not be stored: both are said, that one first
    with put_fails(storage, ".srt"), delete_fails(storage, ".vtt"):
        _, both = ctx.run({**JOB, "output_key": "kept", "subtitles": "srt"})
    assert both["subtitles_error"].startswith("The audio was stored, but its subtitle file could not be (")
    assert "Send the job again for both. An older subtitle file at output/kept.vtt could not be removed" in \
        both["subtitles_error"]


def test_a_job_stopped_between_its_audio_and_its_subtitles_stores_both(ctx, monkeypatch):
    """A shutdown cancels a job (jobs.guard): cancelled once its audio was stored, it never
    stored its subtitle file, and the new audio stood beside the older subtitle file of that key.
    Both now go up in one thread, which a cancelled job waits for."""
    storage = ctx.worker.storage
    storage.put_text("output/stopped.srt", "older subtitles")
    real_upload = storage.upload_file

    async def run():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def upload_then_shut_down(key, path, content_type, *, stop=None):
            real_upload(key, path, content_type, stop=stop)
            if key.endswith(".wav"):  # the audio is stored: the shutdown cancels the job now
                loop.call_soon_threadsafe(task.cancel)
                time.sleep(0.3)  # the cancellation reaches the job before this thread returns

        monkeypatch.setattr(storage, "upload_file", upload_then_shut_down)
        job = parse_job_input({**JOB, "subtitles": "srt", "output_key": "stopped"})
        await ctx.worker.tts("stopped-job", job)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run())
    cues = list(srt.parse(ctx.get_bytes("output/stopped.srt").decode("utf-8")))
    assert cues and " ".join(c.content.replace("\n", " ") for c in cues).split() == TEXT.split()
    assert ctx.get_bytes("output/stopped.wav") is not None


def test_a_verified_word_timed_job_aligns_on_its_transcripts_encoder_pass(ctx, monkeypatch):
    """With verify, each kept try was transcribed already: its alignment reads the encoder output
    the transcription kept, so the encoder runs once per transcribed try and never for alignment."""
    transcriber = ctx.worker.transcriber
    encoder_calls, heard, aligned_fresh = [], [], []
    hook = transcriber.load().model.get_encoder().register_forward_hook(lambda *_: encoder_calls.append(1))
    real_hear, real_align = transcriber.hear, transcriber.align
    monkeypatch.setattr(transcriber, "hear", lambda *a, **k: heard.append(k.get("keep")) or real_hear(*a, **k))
    monkeypatch.setattr(transcriber, "align", lambda *a, encoded=None, **k: aligned_fresh.append(encoded is None)
                        or real_align(*a, encoded=encoded, **k))
    try:
        _, result = ctx.run({**JOB, "timestamps": "word", "verify": True, "verify_retries": 1,
                             "output_key": "verified"})
    finally:
        hook.remove()
    assert "error" not in result, result
    assert_words_in_segments(result)
    assert heard and set(heard) == {True}  # the job is word-timed: each transcription keeps its pass
    assert len(aligned_fresh) == len(result["segments"])
    # A kept try that failed its audio checks was never transcribed: only it is encoded for alignment.
    assert len(encoder_calls) == len(heard) + sum(aligned_fresh)
    assert sum(aligned_fresh) == sum(s["verify"]["error"] is None for s in result["segments"])


def test_inline_audio_leaves_room_for_a_subtitles_error_the_uploads_add(ctx, limit):
    """Whether the audio fits inline is settled before the uploads, and the older subtitle files
    that could not be removed are said after them: the room left that sentence out, so a result
    whose audio just fitted came back over F5_MAX_RESULT_BYTES (by 333 bytes, seen), and RunPod
    would have refused the whole result."""
    job = {**JOB, "output_key": "kept-" + "k" * 150, "return_base64": True, "output_format": "mp3"}  # sized once made

    with delete_fails(ctx.worker.storage, (".srt", ".vtt")):
        _, first = ctx.run(job, "inline-room-1")
        assert "audio_base64" in first and first["subtitles_error"].count("could not be removed") == 2, first
        size = result_bytes(first)
        for max_result_bytes in (size - 1, size - 400):  # the audio fits, the sentences beside it do not
            limit(max_result_bytes)
            _, result = ctx.run(job, "inline-room-2")
            assert result_bytes(result) <= max_result_bytes, (max_result_bytes, result_bytes(result))
