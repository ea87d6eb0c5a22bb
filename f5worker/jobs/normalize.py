"""Numbers spoken as words, on request (``"normalize": true``): cardinals, decimals, ordinals,
percentages, currencies, times, dates, years and common units, in the text's language.

Why this module exists: F5-TTS reads digits badly (rushed or mis-timed numbers are among its most
reported failures), and its duration estimate counts the characters of "1984" where speech needs
"nineteen eighty-four". num2words (about fifty languages) writes the words; this module finds the
numbers. The language is the model's (``F5_MODELS``' ``language``, English for the built-in
models), except that text in Chinese, Japanese or Korean script is taken to be in that language
(Han characters alone, which Japanese and Korean write too, keep a Japanese, Korean or Chinese
model's language). A language num2words lacks (Chinese among them) is left as written, and the
result says so. Addresses (URLs, hosts with a path or port, e-mail addresses) are left as written.
"""
from __future__ import annotations

import datetime
import functools
import re
from dataclasses import dataclass
from typing import Callable

from num2words import CONVERTER_CLASSES, num2words

# Words num2words does not give: the percent sign, and (English only) units and the months.
PERCENT_WORDS = {"en": "percent", "de": "Prozent", "fr": "pour cent", "es": "por ciento", "it": "per cento",
                 "pt": "por cento", "nl": "procent", "pl": "procent", "ru": "процентов", "sv": "procent"}
MONTHS_EN = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December")
UNITS_EN = {"km": "kilometre", "m": "metre", "cm": "centimetre", "mm": "millimetre", "kg": "kilogram",
            "g": "gram", "mg": "milligram", "l": "litre", "ml": "millilitre", "km/h": "kilometres per hour",
            "mph": "miles per hour", "°C": "degree Celsius", "°F": "degree Fahrenheit", "h": "hour",
            "min": "minute", "s": "second", "GB": "gigabyte", "MB": "megabyte", "kB": "kilobyte"}
UNITS_EN_LONG = "|".join(re.escape(u) for u in sorted(UNITS_EN, key=len, reverse=True) if len(u) > 1)
UNITS_EN_SHORT = "|".join(u for u in UNITS_EN if len(u) == 1)
CURRENCY_SIGNS = {"$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY", "₹": "INR"}
SIGN = f"[{''.join(CURRENCY_SIGNS)}]"  # any of them, in a pattern
ORDINAL_SUFFIXES = {"en": "st|nd|rd|th", "fr": "er|re|e|ème", "es": "º|ª|o|a", "it": "º|ª", "pt": "º|ª"}
POINT_DECIMALS = {"en", "ja", "ko", "th", "he", "zh"}  # languages writing 3.5, not 3,5
MAX_DIGITS = 15  # up to the trillions; a longer run of digits (an ID, a serial) stays as written
# Thousands separators besides the language's own mark: the no-break spaces word processors put in
# "1 200 €" (U+00A0; U+202F, the narrow one; U+2009, the thin space). A plain space groups thousands
# only where it is the language's own separator ("25 000 habitants"); elsewhere it separates two
# numbers ("Kapitel 3 100 Seiten").
GROUP_SPACES = "\u00a0\u202f\u2009"
SPACE_GROUPED = {"fr", "ru", "pl", "sv", "cs", "sk", "fi", "no", "uk", "hu"}
# A number is not part of a word of an alphabet, nor of another number ("x2", "2.0.1"); beside Chinese,
# Japanese or Korean characters it is ("3時", "사과 3개"). Anchoring the start also keeps every rule linear.
LETTERS = r"A-Za-z\u00C0-\u024F\u0370-\u03FF\u0400-\u04FF"
START = rf"(?<![\d.,{LETTERS}])"
END = rf"(?![\d{LETTERS}]|[.,]\d)"
OPENING = "\\[{\"'“‘«„¿¡"  # what may stand right before a sign (after a space, or at the start)
SCRIPT_LANGUAGES = ((re.compile(r"[\u3040-\u30ff]"), "ja"), (re.compile(r"[\uac00-\ud7af]"), "ko"))
# Han characters alone say no more than "Chinese, Japanese or Korean": Japanese writes "2024年5月3日"
# and "第3章" without kana, so such text keeps the model's language where it is one of the three.
HAN = re.compile(r"[\u4e00-\u9fff]")
HAN_LANGUAGES = {"ja", "ko", "zh"}
UNSPACED = {"ja", "zh", "th"}  # written without spaces between words: "007" is "零零七"
# A whole token that is an address: a scheme ("http://"), an e-mail ("a@b"), or a dotted host (a
# name ending in letters, or an IPv4 address) with a port or a path after it. Its digits are no
# numbers to say ("example.com/2024/05", ":8080"). PLACEHOLDER stands for it while the rules run: a
# private-use character, no digit or letter, so no rule touches it; a token already holding one is
# kept too, so every placeholder in the text is this module's own.
PLACEHOLDER = "\ue000"
ADDRESS = re.compile(r"://|\w@\w|(?<![\w.-])(?:(?:[\w-]+\.)+[A-Za-z]{2,}|(?:\d{1,3}\.){3}\d{1,3})[:/]|"
                     + PLACEHOLDER)
# A run of the characters a URL or an e-mail address is written in (ASCII: in text without spaces,
# Japanese or Chinese, a run of non-spaces would be the whole sentence, its numbers hidden with it).
ADDRESS_TOKEN = re.compile(r"[A-Za-z0-9_.~:/?#\[\]@!$&'()*+,;=%\-" + PLACEHOLDER + "]+")
ADDRESS_MARKS = re.compile("[:/@" + PLACEHOLDER + "]")  # what every ADDRESS holds


@dataclass(frozen=True)
class Normalized:
    text: str
    replaced: int  # numbers written as words
    lacking: frozenset[str] = frozenset()  # languages num2words lacks whose sentences' digits stay as written

    @property
    def supported(self) -> bool:
        return not self.lacking


def language_of(text: str, model_language: str) -> str:
    """The language a text is normalised in (and that Whisper is told, for ``verify`` and the
    alignment): its script's for kana (Japanese) and Hangul (Korean); for Han characters alone the
    model's where it is Japanese, Korean or Chinese, else Chinese; otherwise the model's."""
    for pattern, language in SCRIPT_LANGUAGES:
        if pattern.search(text):
            return language
    if HAN.search(text):
        return model_language if model_language in HAN_LANGUAGES else "zh"
    return model_language


def supported(language: str) -> bool:
    return language in CONVERTER_CLASSES


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")  # "2.0.1" is not two sentences


def normalize(text: str, model_language: str) -> Normalized:
    """``text`` with its numbers as words, sentence by sentence in each one's language
    (``language_of``: a text may mix English and Chinese)."""
    count, spoken, lacking = 0, [], set()
    separators = SENTENCE_END.findall(text)
    for index, sentence in enumerate(SENTENCE_END.split(text)):
        language = language_of(sentence, model_language)
        if sentence and supported(language):
            sentence, addresses = _protected(sentence)
            for rule in _rules(language):
                sentence, n = rule(sentence)
                count += n
            sentence = _restored(sentence, addresses)
        elif any(c.isdigit() for c in sentence):
            lacking.add(language)
        spoken.append(sentence + (separators[index] if index < len(separators) else ""))
    return Normalized("".join(spoken), count, frozenset(lacking))


def _protected(sentence: str) -> tuple[str, list[str]]:
    """``sentence`` with each address token (``ADDRESS``) replaced by ``PLACEHOLDER``, and the
    tokens replaced, in order: no rule may read a port or a path's digits as a number."""
    addresses: list[str] = []
    if not ADDRESS_MARKS.search(sentence):  # most sentences: no token to look at
        return sentence, addresses

    def hide(match: re.Match) -> str:
        if not ADDRESS.search(match[0]):
            return match[0]
        addresses.append(match[0])
        return PLACEHOLDER

    return ADDRESS_TOKEN.sub(hide, sentence), addresses


def _restored(sentence: str, addresses: list[str]) -> str:
    """``_protected``'s tokens put back where their placeholders stand."""
    tokens = iter(addresses)
    return re.sub(PLACEHOLDER, lambda _: next(tokens), sentence)


def normalize_texts(texts: list[str], model_language: str) -> tuple[list[str], dict]:
    """Each text normalised, and the result's ``normalized`` field: the numbers written as words,
    and the languages whose numbers were left as written (num2words lacks them)."""
    done = [normalize(text, model_language) for text in texts]
    lacking = sorted(set().union(*(n.lacking for n in done)))
    report = {"numbers": sum(n.replaced for n in done)}
    if lacking:
        report["left_as_written"] = (f"Numbers in {', '.join(lacking)} are left as written: num2words, which "
                                     "writes them as words, does not have that language.")
    return [n.text for n in done], report


def _number(raw: str, language: str) -> float | int:
    """A written number as a value: thousands separators dropped, the decimal mark the language's.
    ValueError past ``MAX_DIGITS`` (left as written: num2words takes seconds on a long one)."""
    if sum(c.isdigit() for c in raw) > MAX_DIGITS:
        raise ValueError("too many digits to say as one number")
    grouping = "," if language in POINT_DECIMALS else ". "  # a space is matched only where it groups
    raw = raw.translate({ord(c): None for c in grouping + GROUP_SPACES})
    if language not in POINT_DECIMALS:
        raw = raw.replace(",", ".")
    return float(raw) if "." in raw else int(raw)


def _say(raw: str, language: str) -> str:
    """A written number in words, its written decimals all said: num2words reads a float, so
    "2.50" and "2.0" lost their last zeros ("two point five", "two"). Where the language reads a
    fraction digit by digit (``_digit_by_digit``), each zero num2words drops is said after it.
    A whole number of three digits or more written with a leading zero ("007", "02134", a PIN) is
    a code, not a value: it is said digit by digit ("zero zero seven"), as a value it lost its
    zeros ("seven"). Two digits ("05") are a day, a month or a chapter as often: a value."""
    value = _number(raw, language)
    if len(raw) > 2 and raw.startswith("0") and raw.isdecimal():
        return ("" if language in UNSPACED else " ").join(_words(int(d), language) for d in raw)
    words = _words(value, language)
    fraction = re.split(r"[.,]", raw)[-1] if isinstance(value, float) else ""
    dropped = len(fraction) - len(fraction.rstrip("0"))
    if dropped and (point := _digit_by_digit(language)):
        zero = _words(0, language)
        words += (f" {point}" if dropped == len(fraction) else "") + f" {zero}" * dropped
    return words


@functools.lru_cache(maxsize=None)
def _digit_by_digit(language: str) -> str | None:
    """The language's decimal point word where num2words reads a fraction digit by digit ("one point
    two five"), else None (Russian says "twenty-five hundredths": no zero can be added to that)."""
    point = getattr(CONVERTER_CLASSES[language], "pointword", None)
    if not isinstance(point, str):
        return None
    try:
        reads = _words(1.25, language) == " ".join([_words(1, language), point, _words(2, language), _words(5, language)])
    except Exception:  # noqa: BLE001 - a converter's own bug: no zeros added
        return None
    return point if reads else None


def _iso_date(year: str, month: str, day: str) -> str:
    """An ISO date in English words; ValueError for a day the month lacks (2024-02-30 stays as written)."""
    date = datetime.date(int(year), int(month), int(day))
    return f"{MONTHS_EN[date.month - 1]} {_words(date.day, 'en', to='ordinal')}, {_words(date.year, 'en', to='year')}"


def _words(value, language: str, **kw) -> str:
    return num2words(value, lang=language, **kw)


def _sub(pattern: str, spoken: Callable[[re.Match], str]) -> Callable[[str], tuple[str, int]]:
    """A rule: each match of ``pattern`` spoken; one num2words cannot say is left as written."""
    compiled = re.compile(pattern)

    def apply(text: str) -> tuple[str, int]:
        replaced = 0

        def one(match: re.Match) -> str:
            nonlocal replaced
            try:
                words = spoken(match)
            except Exception:  # noqa: BLE001 - too large, a form this converter lacks, or its own bug
                return match[0]
            replaced += 1
            return words

        return compiled.sub(one, text), replaced

    return apply


@functools.lru_cache(maxsize=None)  # one list per language: a chapter has thousands of sentences
def _rules(language: str) -> tuple[Callable[[str], tuple[str, int]], ...]:
    """The rules in order, most specific first (a currency before its bare number)."""
    number = rf"\d{{1,3}}(?:[,{GROUP_SPACES}]\d{{3}})+(?:\.\d+)?|\d+(?:\.\d+)?" if language in POINT_DECIMALS else \
        rf"\d{{1,3}}(?:[.{' ' if language in SPACE_GROUPED else ''}{GROUP_SPACES}]\d{{3}})+(?:,\d+)?|\d+(?:,\d+)?"
    value = lambda raw: _number(raw, language)  # noqa: E731 - one line, used below
    rules = [
        # A sign before a number is said, in the language's word for it, before the number's own
        # rule says the number: at the start, after a space or an opening bracket or quote. A hyphen
        # joining two ("555-1234", "2024-05-03", "5%-10%") or after a number and a space
        # ("555 -1234") is not a sign.
        _sub(rf"(?:^|(?<=[\s({OPENING}]))(?<!\d\s)[-−](?={SIGN}?\d)", lambda m: _minus(language)),
        # A currency sign before its amount or after it ("$5", "10 €"), whichever the text reaches
        # first: "10$ 20$" and "$10 $20" are each two amounts. A sign right before another amount
        # ("3 $5 bills") is that amount's.
        _sub(rf"({SIGN})\s?({number})\s(million|billion|trillion|thousand)\b",  # "$5 million": of dollars
             lambda m: f"{_words(value(m[2]), language)} {m[3]} {_currency_plural(CURRENCY_SIGNS[m[1]], language)}"),
        _sub(rf"({SIGN})\s?({number}){END}(?!\s?(?:million|billion|trillion|thousand|bn|m|k)\b)"
             rf"|{START}({number})\s?({SIGN})(?!\d)", lambda m: _signed_currency(m, value, language)),
        _sub(rf"{START}({number})\s?(USD|EUR|GBP|JPY|INR)\b", lambda m: _currency(value(m[1]), m[2], language)),
        _sub(rf"{START}({number})\s?%", lambda m: f"{_say(m[1], language)} {PERCENT_WORDS.get(language, '%')}"),
        # A time with fractions of a second ("1:23:45.6") is no time: left as written (the numbers'
        # rule leaves every number beside a ":" and a digit). In English, a time may end in am or pm.
        *_time_rules(language),
    ]
    if language == "en":
        rules += [
            _sub(r"\b(\d{4})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])\b", lambda m: _iso_date(m[1], m[2], m[3])),
            _sub(r"\b((?i:in|since|by|from|until|of|year))\s+(1[1-9]\d\d|20\d\d)\b",
                 lambda m: f"{m[1]} {_words(int(m[2]), 'en', to='year')}"),
            # A one-letter unit only after a space: "the 1990s" and "1.5m people" are no seconds or metres.
            _sub(rf"{START}({number})(\s?(?:{UNITS_EN_LONG})|\s(?:{UNITS_EN_SHORT}))(?![\w/])",
                 lambda m: _unit_en(m[1], m[2].strip())),
        ]
    if language in ORDINAL_SUFFIXES:
        rules.append(_sub(rf"{START}(\d+)(?:{ORDINAL_SUFFIXES[language]})(?!\w)",
                          lambda m: _words(value(m[1]), language, to="ordinal")))
    # Not part of a word, a version or an address ("x2", "2.0.1", "10.0.0.1"): those stay as written.
    # Nor a number beside a ":" and a digit, what no time rule took ("1:23:45.6", "13:30pm", "3:4"):
    # half of it in words ("ten:30am") says neither.
    rules.append(_sub(rf"{START}(?<!\d:)(?:{number}){END}(?!:\d)", lambda m: _say(m[0], language)))
    return tuple(rules)


def _currency(amount, code: str, language: str) -> str:
    """An amount of ``code`` in words. num2words reads a whole number given as currency as cents,
    so whole amounts are the number and the currency's name ("five dollars")."""
    converter = CONVERTER_CLASSES[language]
    forms = _currency_forms(code, language)
    try:
        if isinstance(amount, int) and forms:
            return f"{_words(amount, language)} {converter.pluralize(amount, forms[0])}"
        return _words(float(amount), language, to="currency", currency=code)
    except Exception:  # a converter without this currency, or with a bug of its own in it
        return f"{_words(amount, language)} {code}"


def _signed_currency(match: re.Match, value: Callable[[str], float | int], language: str) -> str:
    """An amount with its currency sign before it (groups 1, 2) or after it (groups 3, 4)."""
    sign, amount = (match[1], match[2]) if match[1] else (match[4], match[3])
    return _currency(value(amount), CURRENCY_SIGNS[sign], language)


def _currency_forms(code: str, language: str):
    """num2words' names of ``code`` in ``language`` (its major unit's first), or None."""
    return getattr(CONVERTER_CLASSES[language], "CURRENCY_FORMS", {}).get(code)


def _currency_plural(code: str, language: str) -> str:
    """The name of many of ``code`` ("dollars"), or the code where the converter has none."""
    forms = _currency_forms(code, language)
    return CONVERTER_CLASSES[language].pluralize(2, forms[0]) if forms else code


def _minus(language: str) -> str:
    """The language's word for a negative sign, as num2words says -1 ("minus ", "moins "), with
    a space after it (Turkish's "eksi" has none, and a digit after a letter is left as written)."""
    negative, positive = _words(-1, language), _words(1, language)
    word = negative[:-len(positive)].strip() if negative.endswith(positive) else ""
    if not any(c.isalpha() for c in word):  # none, or a mark ("(-)"): left as written
        raise ValueError("this converter has no word for the sign")
    return word + " "


def _time_rules(language: str) -> list[Callable[[str], tuple[str, int]]]:
    """The rules of a time with seconds and of one without. In English a time may end in am or pm
    ("10:30am", "9:05 P.M."): had the rule stopped at its letters, the numbers' rule would have said
    the hour alone ("ten:30am"). Its final dot stays where it also ends the sentence ("at 9:05 p.m.")."""
    meridiem = r"(?:\s?(?i:([ap])\.?m)(?:\.(?!\s*$))?)?" if language == "en" else "()"
    time, end = r"(?<![\w:])([01]?\d|2[0-4]):([0-5]\d)", r"(?![\w:]|[.,]\d)"
    return [
        _sub(rf"{time}:([0-5]\d){meridiem}{end}",
             lambda m: _time(int(m[1]), int(m[2]), language, seconds=int(m[3]), meridiem=m[4])),
        _sub(rf"{time}{meridiem}{end}", lambda m: _time(int(m[1]), int(m[2]), language, meridiem=m[3])),
    ]


def _time(hours: int, minutes: int, language: str, seconds: int | None = None, meridiem: str | None = None) -> str:
    """A time in words; ``meridiem``: "a" or "p" (English only), said "a m" / "p m". ValueError
    for an hour no twelve-hour clock has ("13:30pm", left as written)."""
    if language != "en":  # the hour, its minutes unless none, and its seconds unless none
        said = [hours, *([minutes] if minutes or seconds else []), *([seconds] if seconds else [])]
        return " ".join(_words(n, language) for n in said)
    if meridiem and not 1 <= hours <= 12:
        raise ValueError("not a twelve-hour time")
    said = _words(hours, "en")
    if minutes or seconds or not meridiem:  # "seven p m", not "seven o'clock p m"
        said += " " + ("o'clock" if minutes == 0 else f"{'oh ' if minutes < 10 else ''}{_words(minutes, 'en')}")
    said += f" and {_words(seconds, 'en')} second{'s' if seconds != 1 else ''}" if seconds else ""
    return said + (f" {meridiem.lower()} m" if meridiem else "")


def _unit_en(raw: str, unit: str) -> str:
    name = UNITS_EN[unit]
    if _number(raw, "en") != 1 and " per " not in name:
        name = name.replace("degree ", "degrees ") if name.startswith("degree ") else name + "s"
    return f"{_say(raw, 'en')} {name}"
