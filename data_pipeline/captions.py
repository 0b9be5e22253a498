"""Captions and tag lists for synthetic clips, written from the drawn attributes in varied phrasings.

Captions vary in template, word choice ("BPM"/"bpm"/"beats per minute", "plucked guitar"/"acoustic
guitar") and in which attributes they mention, like human-written captions do; the tag list always
carries every attribute, so each clip is paired with both (MuLan trains on either, DESIGN §4.3).
"""
from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

import numpy as np

INSTRUMENT_WORDS = {
    "piano": ("piano", "grand piano", "piano"),
    "organ": ("organ", "church organ", "electric organ"),
    "strings": ("strings", "string ensemble", "string section"),
    "flute": ("flute", "flute", "wooden flute"),
    "guitar": ("plucked guitar", "acoustic guitar", "nylon guitar"),
    "synth bass": ("synth bass", "synthesizer bass", "deep synth bass"),
    "bells": ("bells", "chimes", "glockenspiel"),
    "drums": ("drums", "a drum kit", "a steady drum beat"),
}
TEMPO_WORDS = {"slow": "slow", "medium": "mid-tempo", "fast": "fast"}
TEMPO_TAGS = {"slow": "slow tempo", "medium": "medium tempo", "fast": "fast tempo"}
DYNAMICS_WORDS = {"soft": "soft", "moderate": "moderately loud", "loud": "loud"}
CONTOUR_WORDS = {"steady": "", "crescendo": "gradually building", "decrescendo": "slowly fading"}

TEMPLATES = (
    "{a_mood} {lead} piece in {key} {mode} at {bpm} BPM",
    "{mood} {instruments}, {bpm} bpm",
    "{genre} track with a {lead} melody over {accomp}{bass}{drums}. {key} {mode}, {bpm} BPM.",
    "{tempo} {genre} piece in {key} {mode} featuring {instruments}",
    "instrumental {genre}: {instruments}; {mood} and {dynamics}, around {bpm} beats per minute",
    "{Mood} {mode}-key tune played on {instruments} ({bpm} BPM){contour}",
    "{dynamics} {mood} music: {lead} and {accomp}{drums}, {tempo_tag}",
    "{lead} melody, {accomp} chords{bass}{drums}; {genre}, {key} {mode}, {bpm} bpm",
)


def _fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def _pattern(template: str) -> re.Pattern:
    """A template as a regex: its literal text, any text (maybe none) for each field."""
    return re.compile("".join(re.escape(text) + ("(.*)" if field else "")
                              for text, field, _, _ in string.Formatter().parse(template)))


# The templates that name neither the drums nor every instrument: only the first ("a calm piano piece in …"), which
# names the lead alone. Drums are drawn apart from every word it writes, so its captions leave them to chance (0.55).
_SILENT_ON_DRUMS = tuple(_pattern(t) for t in TEMPLATES if not _fields(t) & {"drums", "instruments"})


def says_drums(caption: str) -> bool:
    """Whether a caption says if drums play: every template but `_SILENT_ON_DRUMS` names them when they do (so
    leaving them out says they do not), and any text naming them says so. Free text is taken at its word."""
    text = caption[:1].lower() + caption[1:]  # `describe` capitalises half the captions
    return "drum" in text.lower() or not any(p.fullmatch(text) for p in _SILENT_ON_DRUMS)


def tempo_band(bpm: float) -> str:
    return "slow" if bpm < 90 else ("medium" if bpm <= 130 else "fast")


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def describe(a: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, list[str]]:
    """(caption, tags) for attributes `a` (see synthetic.draw_attributes)."""
    def word(instrument: str) -> str:
        return str(rng.choice(INSTRUMENT_WORDS[instrument]))

    lead = word(a["lead"])
    accomp = word(a["accompaniment"]) if a["accompaniment"] != a["lead"] else lead
    melodic = list(dict.fromkeys([lead, accomp]))
    others = [word(i) for i in a["instruments"] if i not in (a["lead"], a["accompaniment"])]
    drums_phrase = (" with " + word("drums")) if a["drums"] else str(rng.choice(["", ", no drums", " without drums"]))
    band = tempo_band(a["tempo_bpm"])
    fields = {
        "mood": a["mood"], "a_mood": ("an " if a["mood"][0] in "aeiou" else "a ") + a["mood"], "Mood": a["mood"].capitalize(), "lead": lead, "accomp": accomp,
        "instruments": _join(melodic + others), "genre": a["genre"], "key": a["key"], "mode": a["mode"],
        "bpm": a["tempo_bpm"], "tempo": TEMPO_WORDS[band], "tempo_tag": TEMPO_TAGS[band], "dynamics": DYNAMICS_WORDS[a["dynamics"]],
        "bass": " and " + word("synth bass") if a["bass"] else "", "drums": drums_phrase,
        "contour": (", " + CONTOUR_WORDS[a["contour"]]) if CONTOUR_WORDS[a["contour"]] else "",
    }
    caption = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(**fields)
    caption = caption[0].upper() + caption[1:] if rng.random() < 0.5 else caption
    tags = list(dict.fromkeys(
        list(a["instruments"])
        + ([] if a["drums"] else ["no drums"])
        + [a["mood"], a["genre"], TEMPO_TAGS[band], f"{a['tempo_bpm']} bpm",
           f"{a['key']} {a['mode']}", a["mode"], DYNAMICS_WORDS[a["dynamics"]], "instrumental"]
    ))
    return caption, tags
