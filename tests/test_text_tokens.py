"""f5worker.model.text_tokens against f5-tts 1.1.22's own tokenizer, with f5-tts's functions as the reference.

Covers: the vocabulary map, symbols and ids on a corpus of scripts and punctuation, random mixed
text, every Unicode character outside the slow ranges, the segmenter facts the fast path rests on
(checked against rjieba itself), and, in a fresh interpreter, that English and accented text leave
the Chinese machinery unimported while Chinese text loads it once, from several threads at once.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import rjieba
import torch

from f5worker.model import stock as f5_imports
from f5worker.model import text_tokens
from tests.random_models import packaged_vocab

f5_imports.install()  # f5-tts's model package without its trainer: see f5worker.model.stock
from f5_tts.model.utils import convert_char_to_pinyin, get_tokenizer, list_str_to_idx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

ENGLISH_AND_LATIN = [
    "Hello, world! This is a test.",
    "The quick brown fox jumps over the lazy dog.",
    "Don't stop; it's fine, isn't it? We'll see, y'all.",
    "“Quoted,” she said. ‘Single’ ones too; and \"straight\" or 'plain'.",
    "rock 'n' roll in the 90's: (really) [maybe] {never} <tags>",
    "Ça va? Où est la bibliothèque? Je suis allé à l'école.",
    "Grüße aus München, schöne Straße! Zoë, Noël, façade, jalapeño, smörgåsbord.",
    "Tiếng Việt có dấu: Hà Nội, phở bò, người đẹp, Nguyễn.",
    "Cafe\u0301 nai\u0308ve, decomposed accents.",
    "Call 555-1234 at 3:30 p.m. on 12/25/2024, or 10:45:30 AM.",
    "It costs $19.99, €5, £3.50, ¥100 or ₹250.",
    "Version 1.2.3-beta, 50% off, 3.14159, 2,000,000 and 1st/2nd/3rd.",
    "Wait... what?!?! No way!!! Hmm… really—truly – yes.",
    "a--b, c__d, e..f, g%%h, ++x, #tag & more; first;; second;",
    "Email john.doe+tts@example.com or see https://www.example.org/path_to/page?x=1&y=2#frag.",
    "e.g. U.S.A. i.e., Mr.Smith v1.2.3-beta x_y_z 1.5% 1.2.3",
    "  leading and trailing  ",
    "tabs\tand\t\ttabs, line one\nline two\r\nline three\r\rend\n",
    "a \u00a0non-breaking\u2009thin space\u200b zero width",
    "Good job 👍🏽! Family: 👨\u200d👩\u200d👧\u200d👦, flag 🇫🇷, heart ❤️.",
    "Привет, мир! Как дела? Γειά σου Κόσμε. مرحبا بالعالم. שלום עולם.",
    "สวัสดีครับ नमस्ते दुनिया",
    "안녕하세요, 세계! 한국어 텍스트입니다.",
    "ＡＢＣ１２３！？ fullwidth",
]
NEEDS_SEGMENTER = [
    "I code in C# and C++, c# and c++, at AT&T.",
    "我爱Python编程, and I love 北京!",
    "iPhone 15售价5999元。",
    "银行行长说重要的事情要重复。",
    "我们中出了一个叛徒",
    "长大了，长城很长。了解了，还好还是还了？",
    "〇一二三",
    "こんにちは、世界！カタカナとひらがな。",
    "東京タワーは333メートルです。",
    "ありがとう ございます",
    "\U00020000\U0002a6d6 rare ideographs",
]

# Pieces of the random strings: every kind of character and boundary the corpus has, and more.
PIECES = (list("abcXYZ0189+#&._%-,;:!?'\"()/@$ \t\n\r") + ["\r\n", "C#", "c++", "AT&T", "C", "T"]
          + list("“”‘’…—–€£éèçüößñøœạếộữđ\u0301\u00a0\u3000")
          + list("абвГДαβΣمرحשל") + list("あいカナ안녕한ＡＢ，。！") + ["👍🏽", "👨\u200d👩", "❤️", "🇫🇷"]
          + list("中国行长银重要了还〇") + ["hello", "don't", "3.14", "e-mail", "x_y", "50%", "..."])
LATIN_PIECES = [p for p in PIECES if not text_tokens.needs_segmenter(p)]


def _reference_ids(texts: list[str], vocab: dict[str, int]):
    return list_str_to_idx(convert_char_to_pinyin(texts), vocab)


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    return text_tokens.load_vocab(packaged_vocab())


def test_load_vocab_matches_get_tokenizer(tmp_path):
    reference, size = get_tokenizer(str(packaged_vocab()), "custom")
    ours = text_tokens.load_vocab(packaged_vocab())
    assert ours == reference and list(ours) == list(reference) and len(ours) == size
    # Repeated lines, a CRLF line, an empty line and a last line without its newline.
    odd = tmp_path / "vocab.txt"
    odd.write_bytes(" \na\nb\r\na\n\nzh\u00e0\nlast".encode("utf-8"))
    reference, size = get_tokenizer(str(odd), "custom")
    ours = text_tokens.load_vocab(odd)
    # except that a symbol f5-tts would index past its embedding of ``size`` rows is unknown (0)
    assert reference["las"] == size and ours["las"] == 0
    assert ours == {s: i if i < size else 0 for s, i in reference.items()} and list(ours) == list(reference)
    assert len(ours) == size


@pytest.mark.parametrize("text", ENGLISH_AND_LATIN + NEEDS_SEGMENTER)
def test_corpus_matches_f5_tts(text, vocab):
    expected = convert_char_to_pinyin([text])[0]
    assert text_tokens.text_to_symbols(text) == expected
    assert text_tokens.needs_segmenter(text) == (text in NEEDS_SEGMENTER)
    ids = text_tokens.symbols_to_ids([text_tokens.text_to_symbols(text)], vocab)
    assert ids.dtype == torch.long and ids.tolist() == _reference_ids([text], vocab).tolist()


def test_batch_pads_with_minus_one_and_maps_unknown_symbols_to_zero(vocab):
    texts = ["Hi.", "A longer sentence 👍 with an emoji and 中文.", "🦜"]
    assert "👍" not in vocab and "🦜" not in vocab  # so the unknown-symbol rule is exercised
    ids = text_tokens.symbols_to_ids([text_tokens.text_to_symbols(t) for t in texts], vocab)
    expected = _reference_ids(texts, vocab)
    assert ids.shape == expected.shape and ids.tolist() == expected.tolist()
    assert (ids == -1).any()
    with_empty = text_tokens.symbols_to_ids([[], ["a", "b"]], vocab)  # f5-tts gives float32 here
    assert with_empty.dtype == torch.long
    assert with_empty.tolist() == list_str_to_idx([[], ["a", "b"]], vocab).long().tolist()


@pytest.mark.parametrize("pieces", [PIECES, LATIN_PIECES], ids=["mixed", "latin"])
def test_random_text_matches_f5_tts(pieces, vocab):
    rng = random.Random(1234)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(2000)]
    fast = sum(not text_tokens.needs_segmenter(t) for t in texts)
    assert fast >= 1800 if pieces is LATIN_PIECES else 100 <= fast <= 1900  # both paths get their share
    for text in texts:
        assert text_tokens.text_to_symbols(text) == convert_char_to_pinyin([text])[0], repr(text)
    ours = text_tokens.symbols_to_ids([text_tokens.text_to_symbols(t) for t in texts[:64]], vocab)
    assert ours.tolist() == _reference_ids(texts[:64], vocab).tolist()


def test_fast_cut_is_rjiebas_cut_on_every_short_string():
    """Every string of up to 4 of these characters: the fast cut is rjieba's, segment for segment."""
    alphabet = "a1._-+#&% ,\r\né—CT"
    checked = 0
    for length in range(1, 5):
        for chars in itertools.product(alphabet, repeat=length):
            text = "".join(chars)
            if not text_tokens.needs_segmenter(text):
                assert list(text_tokens._fast_segments(text)) == rjieba.cut(text), repr(text)
                checked += 1
    assert checked > 80000


def test_every_character_outside_the_slow_ranges_matches_f5_tts():
    """Each character, doubled and between ASCII, in the BMP and the emoji and tag planes."""
    code_points = itertools.chain(range(0x10000), range(0x1F000, 0x1FB00), range(0xE0000, 0xE0200))
    checked = 0
    for code_point in code_points:
        text = f"a{chr(code_point) * 2}ab{chr(code_point)}"
        if not text_tokens.needs_segmenter(text):
            assert text_tokens.text_to_symbols(text) == convert_char_to_pinyin([text])[0], hex(code_point)
            checked += 1
    assert checked > 30000  # the BMP less the slow ranges, plus the two supplementary blocks


def test_the_only_ascii_dictionary_words_are_routed_to_the_segmenter():
    """rjieba's dictionary words of up to 3 block characters are C#, c#, C++ and c++ (AT&T has 4)."""
    block_chars = [c for c in map(chr, range(0x21, 0x7F)) if c.isalnum() or c in "+#&._%-"]
    words = {"".join(chars) for length in (1, 2, 3) for chars in itertools.product(block_chars, repeat=length)
             if rjieba.has_word("".join(chars))}
    assert words == {"C#", "c#", "C++", "c++"}
    for word in words | {"AT&T"}:
        assert rjieba.has_word(word) and text_tokens.needs_segmenter(f"x {word} y")


def test_lone_surrogate_fails_as_f5_tts_does():
    with pytest.raises(UnicodeEncodeError):
        convert_char_to_pinyin(["a\ud800"])
    with pytest.raises(UnicodeEncodeError):
        text_tokens.text_to_symbols("a\ud800")


_SUBPROCESS = """
import json, logging, sys, threading
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from f5worker.model import text_tokens
HEAVY = ("rjieba", "jieba", "pypinyin", "f5_tts", "x_transformers", "einx", "transformers")
latin = [text_tokens.text_to_symbols(t) for t in json.loads(sys.argv[1])]
before = [m for m in HEAVY if m in sys.modules]
barrier = threading.Barrier(8)
chinese = [None] * 8
def convert(i):
    barrier.wait()
    chinese[i] = text_tokens.text_to_symbols(sys.argv[2])
threads = [threading.Thread(target=convert, args=(i,)) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"latin": latin, "before": before, "after": [m for m in HEAVY if m in sys.modules],
                  "chinese": chinese}))
"""


def test_english_leaves_chinese_machinery_unimported_and_chinese_loads_it_once():
    latin = ["Hello, world! Don't stop; it's 3:30.", "Ça va? Grüße aus München. Tiếng Việt."]
    chinese = "我们中出了一个叛徒, and 银行行长!"
    done = subprocess.run([sys.executable, "-c", _SUBPROCESS, json.dumps(latin), chinese], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["before"] == []
    assert result["latin"] == convert_char_to_pinyin(latin)
    assert {"rjieba", "pypinyin"} <= set(result["after"])
    assert not {"jieba", "f5_tts", "x_transformers", "einx", "transformers"} & set(result["after"])
    assert result["chinese"] == [convert_char_to_pinyin([chinese])[0]] * 8
    assert done.stderr.count("Loading the Chinese segmenter") == 1


# The scripts the community fine-tunes of f5-tts's SHARED.md serve, each with a vocabulary of its
# own as a fine-tune ships it (the characters of its training text): Finnish, French, German,
# Italian, Japanese, Latvian, Russian, Spanish (F5TTS_Base layout), Hindi (Small), Arabic (Small).
FINE_TUNE_CORPUS = {
    "fi": "Hyvää huomenta! Äiti ja isä söivät jäätelöä, eikö? Öljyä 3,5 litraa.",
    "fr": "Ça alors ! L'œuvre coûte 12 € ; où est-elle ? « Très bien », dit-il.",
    "de": "Grüß Gott! Die Straße ist 5 km lang – schön, oder? Fußgänger überqueren sie.",
    "it": "Perché no? È già l'una: c'è un caffè là, più tardi andrò.",
    "ja": "今日はいい天気ですね。カタカナも、ひらがなも、漢字も読めます！",
    "lv": "Labdien! Ķēķis, ģimene, ļoti, ņemt, šodien, žurnāls — 12 eiro.",
    "ru": "Здравствуйте! Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "es": "¿Qué tal? ¡Señor Núñez, el pingüino bebió agua! Año 2024.",
    "hi": "नमस्ते दुनिया! आज मौसम बहुत अच्छा है, है ना? १२३ रुपये।",
    "ar": "مرحبا بالعالم! كيف حالك اليوم؟ ١٢٣ درهم.",
}


def fine_tune_vocab(path: Path, texts: list[str], left_out: str) -> Path:
    """A vocab.txt of the symbols of ``texts`` (one per line, f5-tts's format), ``left_out`` not
    among them: those map as f5-tts maps a symbol outside the vocabulary."""
    symbols = sorted({s for t in texts for s in convert_char_to_pinyin([t])[0]} - set(left_out))
    path.write_text("".join(f"{s}\n" for s in [" ", *[s for s in symbols if s != " "]]), encoding="utf-8")
    return path


@pytest.mark.parametrize("lang", FINE_TUNE_CORPUS)
def test_each_fine_tunes_script_with_its_own_vocabulary_matches_f5_tts(lang, tmp_path):
    text = FINE_TUNE_CORPUS[lang]
    vocab_file = fine_tune_vocab(tmp_path / "vocab.txt", [text, "abc"], left_out=text[3] + "!")
    reference, size = get_tokenizer(str(vocab_file), "custom")
    ours = text_tokens.load_vocab(vocab_file)
    assert ours == reference and len(ours) == size
    symbols = text_tokens.text_to_symbols(text)
    assert symbols == convert_char_to_pinyin([text])[0]
    ids = text_tokens.symbols_to_ids([symbols], ours)
    assert ids.tolist() == _reference_ids([text], reference).tolist()
    assert 0 in ids.tolist()[0]  # the left-out symbols really were outside the vocabulary
