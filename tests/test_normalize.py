"""Numbers as words (``"normalize": true``): each kind of number in the languages num2words has, the
ones left alone, a language it lacks said so, and a job whose segments say what was spoken.

The expected words are num2words' own (called here for each value), so a test fails when this
module finds, splits or reads a number wrongly, not when num2words words one differently.
"""
from __future__ import annotations

import pytest
from num2words import num2words

from f5worker.jobs.inputs import MAX_TEXT_CHARS, parse_job_input
from f5worker.jobs.normalize import language_of, normalize, normalize_texts
from tests.fixtures_worker import worker_ctx
from tests.helpers import assert_one_sentence

EN_CASES = [
    ("I have 3 cats.", f"I have {num2words(3)} cats."),
    ("It costs $12.50 today.", f"It costs {num2words(12.5, to='currency', currency='USD')} today."),
    ("It costs 12.50 EUR.", f"It costs {num2words(12.5, to='currency', currency='EUR')}."),
    ("A 15% rise.", f"A {num2words(15)} percent rise."),
    ("Meet at 9:05 or 10:30 or 7:00.", "Meet at nine oh five or ten thirty or seven o'clock."),
    ("Born on 2024-05-03.", f"Born on May {num2words(3, to='ordinal')}, {num2words(2024, to='year')}."),
    ("In 1984 they met.", f"In {num2words(1984, to='year')} they met."),
    ("The 2nd and the 21st.", f"The {num2words(2, to='ordinal')} and the {num2words(21, to='ordinal')}."),
    ("It is 1,234,567 km away.", f"It is {num2words(1234567)} kilometres away."),
    ("Drive 1 km at 50 km/h in 10 °C.", f"Drive one kilometre at {num2words(50)} kilometres per hour in "
                                        f"{num2words(10)} degrees Celsius."),
    ("Pi is 3.14.", f"Pi is {num2words(3.14)}."),
    # num2words reads a whole number given as currency as cents: whole amounts are said as such
    ("$5, $100 and 10 USD.", "five dollars, one hundred dollars and ten dollars."),
    ("The 1990s and 1.5m people in 5 s.", f"The 1990s and 1.5m people in {num2words(5)} seconds."),
    # A sign before a number is said; a hyphen between two is not a sign.
    ("It is -5 °C, a -$5 loss.", f"It is {num2words(-5)} degrees Celsius, a minus five dollars loss."),
    ("Dates like 2024-05-03 and ranges like 5-10.", f"Dates like May {num2words(3, to='ordinal')}, "
                                                     f"{num2words(2024, to='year')} and ranges like five-ten."),
    ("At 10:30:45, 10:00:01 and 24:00.", "At ten thirty and forty-five seconds, ten o'clock and one second and "
                                         "twenty-four o'clock."),
    # A hyphen after a symbol or after a number and a space joins, it is no sign.
    ("Growth was 5%-10% last year.", "Growth was five percent-ten percent last year."),
    ("Call 555 -1234.", f"Call {num2words(555)} -{num2words(1234)}."),
    ("(-5) or \"-3\".", "(minus five) or \"minus three\"."),
    # Each currency sign belongs to its own amount, written before or after it.
    ("Prices 10$ 20$ each.", "Prices ten dollars twenty dollars each."),
    ("Prices $10 $20 each.", "Prices ten dollars twenty dollars each."),
    ("I have 3 $5 bills.", "I have three five dollars bills."),
    ("A $5 million deal.", "A five million dollars deal."),
]


@pytest.mark.parametrize("text, spoken", EN_CASES)
def test_english_numbers_as_words(text, spoken):
    done = normalize(text, "en")
    assert done.text == spoken and done.supported and done.replaced >= 1


@pytest.mark.parametrize("text", ["Version 2.0.1 is out.", "Call x2 now.", "Host 10.0.0.1 answers.", "No digits.",
                                  # Fractions of a second are not part of a time's seconds, and no number
                                  # beside a ":" and a digit is said alone ("ten:30am" said neither).
                                  "A lap of 1:23:45.6 today.", "It is 13:30pm.", "A ratio of 3:4."])
def test_what_is_not_a_number_stays_as_written(text):
    done = normalize(text, "en")
    assert done.text == text and done.replaced == 0


@pytest.mark.parametrize("text, spoken", [
    ("Meet at 10:30am.", "Meet at ten thirty a m."),
    ("Doors open 9:05pm.", "Doors open nine oh five p m."),
    ("At 10:30 A.M., then 7:00 p.m.", "At ten thirty a m, then seven p m."),
    ("Wake at 6:15:30 AM!", f"Wake at six fifteen and {num2words(30)} seconds a m!"),
    ("At 10:30 amid 3 cats.", f"At ten thirty amid {num2words(3)} cats."),  # a word, not the meridiem
])
def test_a_time_with_am_or_pm_is_said_whole(text, spoken):
    """"10:30am" was "ten:30am": the time's rule stopped at the letters, and the numbers' rule said the hour."""
    assert normalize(text, "en").text == spoken


@pytest.mark.parametrize("address", ["http://10.0.0.1:8080/api/v1/items/17", "example.com/2024/05/report",
                                     "www.example.com:8443", "team_7@example.com", "10.0.0.1/24"])
def test_an_address_stays_as_written_and_the_numbers_beside_it_are_said(address):
    """"example.com/2024/05/report" was "example.com/two thousand and twenty-four/five/report"."""
    done = normalize(f"Open {address} in 3 tabs.", "en")
    assert done.text == f"Open {address} in {num2words(3)} tabs." and done.replaced == 1
    # in text without spaces the address alone is kept, not the whole sentence around it
    done = normalize(f"りんごは3個、詳細は{address}で", "ja")
    assert done.text == f"りんごは{num2words(3, lang='ja')}個、詳細は{address}で" and done.replaced == 1


@pytest.mark.parametrize("text, language, code", [
    ("Boston, MA 02134.", "en", "02134"), ("Agent 007.", "en", "007"), ("Your PIN is 0042.", "en", "0042"),
    ("Agent 007.", "de", "007"),
])
def test_a_number_with_a_leading_zero_is_said_digit_by_digit(text, language, code):
    """"007" was "seven", "02134" "two thousand, one hundred and thirty-four": a code, not a value."""
    digits = " ".join(num2words(int(d), lang=language) for d in code)
    assert normalize(text, language).text == text.replace(code, digits)


def test_a_leading_zero_is_still_a_value_in_decimals_times_and_two_digits():
    assert normalize("It is 0.5 or 0 at 09:05.", "en").text == f"It is {num2words(0.5)} or {num2words(0)} at nine oh five."
    assert normalize("Chapter 05 of 12.", "en").text == f"Chapter {num2words(5)} of {num2words(12)}."  # a month, a day
    zero, seven = num2words(0, lang="ja"), num2words(7, lang="ja")
    assert normalize("第007話。", "ja").text == f"第{zero}{zero}{seven}話。"  # Japanese puts no space between them


def test_beside_chinese_japanese_or_korean_characters_a_number_is_one():
    assert normalize("今日は3時です。", "en").text == f"今日は{num2words(3, lang='ja')}時です。"
    assert normalize("사과 3개.", "en").text == f"사과 {num2words(3, lang='ko')}개."


@pytest.mark.parametrize("language", ["pt_BR", "vi", "sv", "tr", "da"])
def test_a_converter_without_a_currency_or_with_a_bug_never_fails_a_job(language):
    done = normalize("It costs $5 or 5 EUR today, 3 times.", language)
    assert done.supported and done.replaced == 3 and not any(c.isdigit() for c in done.text), done.text


def test_other_languages_use_their_words_and_decimal_mark():
    assert normalize("Es kostet 12,50 EUR für 3 Personen.", "de").text == (
        f"Es kostet {num2words(12.5, lang='de', to='currency', currency='EUR')} für {num2words(3, lang='de')} Personen.")
    assert normalize("Kapitel 3 100 Seiten.", "de").text == (  # a plain space separates two numbers
        f"Kapitel {num2words(3, lang='de')} {num2words(100, lang='de')} Seiten.")
    assert normalize("Es kostet 12,50 € bei -3 Grad.", "de").text == (  # the sign after the amount, as written there
        f"Es kostet {num2words(12.5, lang='de', to='currency', currency='EUR')} bei {num2words(-3, lang='de')} Grad.")
    assert normalize("Il y a 1.000 personnes, 15 %.", "fr").text == (
        f"Il y a {num2words(1000, lang='fr')} personnes, {num2words(15, lang='fr')} pour cent.")


@pytest.mark.parametrize("text, language, value", [
    ("Le loyer est de 1\u00a0200 € par mois.", "fr", 1200),  # the no-break space word processors write
    ("Il y a 25 000 habitants.", "fr", 25000),  # French groups with a plain space too
    ("Es sind 1\u202f500 Euro.", "de", 1500),
    ("It is 1\u00a0000 metres away.", "en", 1000),
])
def test_thousands_grouped_by_a_no_break_space_are_one_number(text, language, value):
    """"1 200 €" was "un deux cents euros": the separator word processors put there split it in two."""
    spoken = normalize(text, language).text
    assert num2words(value, lang=language) in spoken and not any(c.isdigit() for c in spoken), spoken


@pytest.mark.parametrize("text, language, said", [
    ("It weighs 2.50 kg.", "en", "two point five zero kilograms"),
    ("Version 2.0 is out.", "en", "Version two point zero is out"),
    ("Es sind 2,0 Grad.", "de", "zwei Komma null Grad"),
    ("Rate 3.10%.", "en", "three point one zero percent"),
])
def test_written_decimals_are_all_said(text, language, said):
    """num2words reads a float, so "2.50" and "2.0" lost their last zeros ("two point five", "two")."""
    assert said in normalize(text, language).text


def test_a_language_that_reads_fractions_as_a_whole_gets_no_zeros_added():
    assert normalize("2,50", "ru").text == num2words(2.5, lang="ru")


def test_an_impossible_date_is_not_read_as_one():
    spoken = normalize("On 2024-02-30 and 2024-02-29.", "en").text
    assert "February thirtieth" not in spoken and "February twenty-ninth, twenty twenty-four" in spoken


@pytest.mark.parametrize("language", ["de", "ru", "es", "fr"])
def test_a_time_says_its_zero_minutes_when_seconds_follow(language):
    """10:00:45 is not 10:45: the minutes are left out only where nothing follows them."""
    say = lambda n: num2words(n, lang=language)  # noqa: E731
    assert normalize("10:00:45", language).text == f"{say(10)} {say(0)} {say(45)}"
    assert normalize("10:30:00", language).text == f"{say(10)} {say(30)}"
    assert normalize("10:00", language).text == say(10)


def test_a_sign_is_a_word_of_its_own_or_left_as_written():
    """num2words writes Turkish's sign without a space (-5 is 'eksibeş'): the sign became 'eksi'
    before '5', which as a digit after a letter was left as written ('eksi5'). A converter whose sign is a
    mark, not a word (Kannada's '(-)'), leaves the sign as written."""
    assert normalize("Hava -5 derece.", "tr").text == f"Hava eksi {num2words(5, lang='tr')} derece."
    assert normalize("-5", "kn").text == f"-{num2words(5, lang='kn')}"


def test_a_currency_sign_after_each_amount_is_that_amounts():
    assert normalize("10 € 20 € 30 €.", "fr").text == " ".join(
        f"{num2words(n, lang='fr')} euros" for n in (10, 20, 30)) + "."


@pytest.mark.parametrize("model_language", ["ja", "ko", "zh"])
def test_han_characters_alone_keep_a_chinese_japanese_or_korean_models_language(model_language):
    """Japanese writes "2024年5月3日" without kana: a Japanese model's such sentences were taken for
    Chinese, their numbers left as written (and Whisper told "zh" for them)."""
    for text in ("2024年5月3日。", "第3章。", "東京都、人口1400万人。"):
        assert language_of(text, model_language) == model_language
    assert language_of("今日は3時です。", model_language) == "ja" and language_of("사과 3개.", model_language) == "ko"
    assert language_of("第3章。", "en") == language_of("第3章。", "de") == "zh"


def test_a_japanese_models_han_sentences_have_their_numbers_said():
    say = lambda n: num2words(n, lang="ja")  # noqa: E731
    texts, report = normalize_texts(["2024年5月3日。東京都、人口1400万人。"], "ja")
    assert texts == [f"{say(2024)}年{say(5)}月{say(3)}日。東京都、人口{say(1400)}万人。"]
    assert report == {"numbers": 4}


def test_a_language_num2words_lacks_is_left_as_written_and_said():
    assert language_of("我有3个苹果。", "en") == "zh"
    texts, report = normalize_texts(["I had 3 cats. 我有3个苹果。Then 2 more!"], "en")
    assert texts == [f"I had {num2words(3)} cats. 我有3个苹果。Then {num2words(2)} more!"]
    assert report["numbers"] == 2
    assert report["left_as_written"] == ("Numbers in zh are left as written: num2words, which writes them as words, "
                                         "does not have that language.")
    assert normalize_texts(["No numbers here."], "en")[1] == {"numbers": 0}


def test_a_number_too_long_to_say_stays_as_written():
    """Past 15 digits (an ID, a serial) a number is left as written: num2words would take seconds
    on a long one, and a text of 100,000 digits must not hold the worker."""
    for huge in ("9" * 16, "9" * 100_000, "1,234," * 6 + "5"):
        assert normalize(f"It is {huge}.", "en").text == f"It is {huge}."
    assert normalize("It is 999999999999999.", "en").text == f"It is {num2words(999999999999999)}."


def test_normalize_is_a_strict_boolean():
    job = {"text": "Hi 3.", "local_voice": "basic_ref_en.wav"}
    assert parse_job_input({**job, "normalize": True}).normalize is True
    assert parse_job_input(job).normalize is False
    with pytest.raises(Exception, match="normalize"):
        parse_job_input({**job, "normalize": "yes"})


def test_a_job_speaks_its_numbers_and_says_so(tiny_models, tiny_whisper, tmp_path):
    with worker_ctx(tiny_models, tiny_whisper, tmp_path) as ctx:
        job = {"text": "We sold 3 books for $20. 我有3个苹果。", "local_voice": "basic_ref_en.wav", "nfe_step": 2,
               "seed": 4, "return_base64": False}
        _, plain = ctx.run(job)
        _, spoken = ctx.run({**job, "normalize": True})
    assert "normalized" not in plain and "3 books" in " ".join(s["text"] for s in plain["segments"])
    said = " ".join(s["text"] for s in spoken["segments"])
    assert f"{num2words(3)} books for twenty dollars" in said and "3个" in said
    assert spoken["normalized"]["numbers"] == 2 and "zh" in spoken["normalized"]["left_as_written"]
    assert spoken["duration"] > plain["duration"]  # the words take longer to say than the digits


def test_a_text_whose_numbers_say_too_much_is_refused_before_the_model(tiny_models, tiny_whisper, tmp_path):
    """A run of digits is about ten times longer as words: a text the job takes can speak far more
    than a job may. It is refused before any model call, and the same text without normalize runs."""
    digits = "1234567 " * 2_000  # 16,000 characters; as words about 160,000
    assert len(normalize(digits, "en").text) > MAX_TEXT_CHARS
    with worker_ctx(tiny_models, tiny_whisper, tmp_path) as ctx:
        before = ctx.keys()
        calls = len(ctx.worker.batcher.calls)
        _, refused = ctx.run({"text": digits, "local_voice": "basic_ref_en.wav", "normalize": True,
                              "return_base64": False})
        message = assert_one_sentence(refused)
        assert message.startswith("With its numbers written as words the text is ") and "100,000" in message
        assert ctx.keys() == before and ctx.tmp_files() == []
        assert len(ctx.worker.batcher.calls) == calls, "a refused job reached the model"
        _, plain = ctx.run({"text": digits[:400], "local_voice": "basic_ref_en.wav", "nfe_step": 2,
                            "return_base64": False})
    assert "error" not in plain and len(ctx.worker.batcher.calls) > calls
