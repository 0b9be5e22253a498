"""Captions and tag lists for synthetic clips, written from the drawn attributes in varied phrasings.

Captions vary in template, word choice ("BPM"/"bpm"/"beats per minute", "plucked guitar"/"acoustic
guitar") and in which attributes they mention, like human-written captions do; the tag list always
carries every attribute, so each clip is paired with both (MuLan trains on either, DESIGN §4.3).
"""
from __future__ import annotations

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
