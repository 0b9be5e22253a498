"""The built-in synthetic captioned music dataset: deterministic, numpy only, far faster than real time.

A clip is drawn as attributes (tempo, key, mode, instruments, drums, mood, genre, dynamics, chord
progression), composed on an exact beat grid in 4/4 (chords with voice leading, a repeated-motif
melody that lands on chord tones, a bass line, a drum pattern), rendered with the voices of
`instruments.py`, mixed, given a little reverb and faded at the edges. The attributes are returned
with the audio so later evaluation can check generated audio against a requested prompt.

The rhythm is arranged so the beat is the clearest periodicity — no eighth-note subdivisions below
80 or above 140 BPM, a snare on every beat above 140 BPM (a 2/4 backbeat there is heard at half
tempo), and a beat-level pulse from the accompaniment or bass when there are no drums — which is
what lets beat tracking recover the drawn tempo rather than its double or half.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from data_pipeline.captions import describe, tempo_band
from data_pipeline.instruments import render_drum, render_note

LEADS = ("piano", "flute", "strings", "organ", "bells", "guitar")
ACCOMPANIMENTS = ("piano", "organ", "strings", "guitar")
PITCH_NAMES = {
    "major": ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"),
    "minor": ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B"),
}
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Roman numerals over the key's scale (upper case = major triad); minor's V is major (raised leading tone).
PROGRESSIONS = {
    "major": (("I", "V", "vi", "IV"), ("I", "IV", "V", "IV"), ("I", "vi", "IV", "V"),
              ("I", "IV", "I", "V"), ("I", "ii", "V", "I"), ("I", "V", "IV", "I")),
    "minor": (("i", "VI", "VII", "i"), ("i", "iv", "V", "i"), ("i", "VII", "VI", "V"),
              ("i", "iv", "VI", "V"), ("i", "VI", "iv", "V"), ("i", "iv", "i", "V")),
}
NUMERALS = {"i": 0, "ii": 1, "iii": 2, "iv": 3, "v": 4, "vi": 5, "vii": 6}
MOODS = {
    ("slow", "major"): ("calm", "peaceful", "dreamy", "romantic", "gentle"),
    ("slow", "minor"): ("melancholic", "sad", "somber", "reflective", "dark"),
    ("medium", "major"): ("happy", "playful", "uplifting", "warm", "cheerful"),
    ("medium", "minor"): ("mysterious", "dramatic", "moody", "nostalgic", "tense"),
    ("fast", "major"): ("upbeat", "energetic", "joyful", "bright", "lively"),
    ("fast", "minor"): ("intense", "driving", "urgent", "energetic", "dark"),
}
DYNAMICS = {"soft": (0.35, 0.5), "moderate": (0.55, 0.7), "loud": (0.75, 0.9)}  # peak level ranges
ATTRIBUTE_KEYS = ("tempo_bpm", "tonic", "mode", "lead", "accompaniment", "bass", "drums",
                  "progression", "dynamics", "contour", "mood", "genre")
GAINS = {"lead": 0.9, "accompaniment": 0.45, "bass": 0.75, "kick": 0.6, "snare": 0.45,
         "hat": 0.15, "open hat": 0.12, "crash": 0.2}


class SyntheticClip(NamedTuple):
    audio: np.ndarray  # float32 [T], mono
    attributes: dict[str, Any]
    caption: str
    tags: list[str]


def _eighths_ok(bpm: float) -> bool:
    return 80 <= bpm <= 140


DRUM_PATTERNS = {  # instrument → onsets within a 4-beat bar
    "backbeat": {"kick": (0, 2), "snare": (1, 3), "hat": tuple(np.arange(0, 4, 0.5))},
    "slow backbeat": {"kick": (0, 2), "snare": (1, 3), "hat": (0, 1, 2, 3)},
    "four on the floor": {"kick": (0, 1, 2, 3), "snare": (1, 3), "open hat": (0.5, 1.5, 2.5, 3.5)},
    # Above 140 BPM a 2/4 backbeat is heard at half tempo: a snare on every beat keeps the pulse.
    "driving": {"kick": (0, 1, 2, 3), "snare": (0, 1, 2, 3), "hat": (0, 1, 2, 3)},
}


def drum_pattern(a: Mapping[str, Any]) -> str:
    bpm = a["tempo_bpm"]
    if bpm > 140:
        return "driving"
    if a["genre"] in ("electronic dance", "house"):
        return "four on the floor"
    return "backbeat" if _eighths_ok(bpm) else "slow backbeat"


def _genre(rng: np.random.Generator, a: Mapping[str, Any]) -> str:
    if a["drums"]:
        if a["bass"] and a["tempo_bpm"] >= 110 and a["accompaniment"] in ("organ", "piano"):
            return str(rng.choice(["electronic dance", "synth-pop", "house"]))
        if "guitar" in (a["lead"], a["accompaniment"]):
            return str(rng.choice(["pop rock", "indie pop", "soft rock"]))
        return str(rng.choice(["pop", "lo-fi", "funk" if a["tempo_bpm"] >= 95 else "lo-fi"]))
    if "strings" in (a["lead"], a["accompaniment"]):
        return str(rng.choice(["cinematic", "orchestral", "chamber music"]))
    if a["lead"] == "bells" and a["tempo_bpm"] < 110:
        return str(rng.choice(["lullaby", "ambient"]))
    if a["lead"] in ("flute", "guitar") or a["accompaniment"] == "guitar":
        return str(rng.choice(["folk", "acoustic", "new age"]))
    if a["accompaniment"] == "organ":
        return str(rng.choice(["hymn", "gospel", "baroque"]))
    return str(rng.choice(["classical", "piano ballad", "easy listening"]))


def draw_attributes(rng: np.random.Generator, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Draws a clip's attributes; `overrides` fixes any of ATTRIBUTE_KEYS (the rest adapt to them)."""
    fixed = dict(overrides or {})
    unknown = set(fixed) - set(ATTRIBUTE_KEYS)
    if unknown:
        raise ValueError(f"unknown synthetic attributes {sorted(unknown)}; allowed: {ATTRIBUTE_KEYS}")
    a: dict[str, Any] = {}

    def pick(key: str, draw):
        a[key] = fixed[key] if key in fixed else draw()

    pick("tempo_bpm", lambda: int(rng.integers(60, 181)))
    pick("tonic", lambda: int(rng.integers(12)))
    pick("mode", lambda: str(rng.choice(["major", "minor"])))
    pick("drums", lambda: bool(rng.random() < 0.55))
    pick("lead", lambda: str(rng.choice(LEADS)))
    pick("accompaniment", lambda: str(rng.choice(ACCOMPANIMENTS)))
    # Without drums, a sustained accompaniment needs the bass to carry the beat.
    needs_bass = not a["drums"] and a["accompaniment"] == "strings"
    pick("bass", lambda: bool(needs_bass or rng.random() < (0.7 if a["drums"] else 0.4)))
    progressions = PROGRESSIONS[a["mode"]]
    pick("progression", lambda: list(progressions[int(rng.integers(len(progressions)))]))
    band = tempo_band(a["tempo_bpm"])
    pick("mood", lambda: str(rng.choice(MOODS[(band, a["mode"])])))
    soft_first = band == "slow"
    pick("dynamics", lambda: str(rng.choice(list(DYNAMICS), p=[0.5, 0.35, 0.15] if soft_first else [0.15, 0.45, 0.4])))
    pick("contour", lambda: str(rng.choice(["steady", "crescendo", "decrescendo"], p=[0.6, 0.25, 0.15])))
    pick("genre", lambda: _genre(rng, a))
    a["key"] = PITCH_NAMES[a["mode"]][a["tonic"] % 12]
    a["instruments"] = list(dict.fromkeys(
        [a["lead"], a["accompaniment"]] + (["synth bass"] if a["bass"] else []) + (["drums"] if a["drums"] else [])
    ))
    a["time_signature"] = "4/4"
    a["drum_pattern"] = drum_pattern(a) if a["drums"] else "none"
    return a


def _chord_pitch_classes(numeral: str, tonic: int, mode: str) -> list[int]:
    scale = SCALES[mode]
    degree = NUMERALS[numeral.lower()]
    pcs = [(tonic + scale[(degree + 2 * i) % 7]) % 12 for i in range(3)]
    if mode == "minor" and numeral == "V":  # harmonic minor: raise the third of V
        pcs[1] = (pcs[1] + 1) % 12
    return pcs


def _chord_scale(numeral: str, tonic: int, mode: str) -> list[int]:
    """Pitch classes a melody may use over this chord (harmonic minor over minor's V)."""
    pcs = [(tonic + s) % 12 for s in SCALES[mode]]
    if mode == "minor" and numeral == "V":
        pcs[6] = (pcs[6] + 1) % 12
    return pcs


def _voicing(pcs: list[int], previous: list[int] | None, center: int = 60) -> list[int]:
    """Closest-position triad around `center`, choosing the inversion nearest the previous chord."""
    candidates = []
    for inv in range(3):
        notes = pcs[inv:] + pcs[:inv]
        base = center - 6 + (notes[0] - (center - 6)) % 12
        voiced = [base]
        for pc in notes[1:]:
            voiced.append(voiced[-1] + (pc - voiced[-1]) % 12)
        candidates.append(voiced)
    if previous is None:
        return min(candidates, key=lambda v: abs(sum(v) / 3 - center))
    return min(candidates, key=lambda v: sum(abs(x - y) for x, y in zip(v, previous)))


def _nearest(pcs: list[int], target: float, lo: int, hi: int) -> int:
    options = [m for m in range(lo, hi + 1) if m % 12 in pcs]
    return min(options, key=lambda m: (abs(m - target), m))


class _Score:
    """Note events in beats; rendered into a sample buffer with a per-clip render cache."""

    def __init__(self, bpm: float, sr: int, n: int):
        self.beat = 60.0 / bpm
        self.sr = sr
        self.parts: dict[str, np.ndarray] = {}
        self.n = n
        self._cache: dict[tuple, np.ndarray] = {}

    def _add(self, part: str, start_s: float, wave: np.ndarray, gain: float) -> None:
        buf = self.parts.setdefault(part, np.zeros(self.n, np.float32))
        i = int(round(start_s * self.sr))
        if i >= self.n:
            return
        seg = wave[: self.n - i]
        buf[i : i + len(seg)] += np.float32(gain) * seg

    def note(self, part: str, instrument: str, midi: int, beat: float, beats: float, velocity: float) -> None:
        key = (instrument, midi, round(beats * self.beat, 4))
        if key not in self._cache:
            self._cache[key] = render_note(instrument, midi, beats * self.beat, self.sr)
        self._add(part, beat * self.beat, self._cache[key], GAINS[part] * velocity)

    def drum(self, name: str, beat: float, velocity: float) -> None:
        if name not in self._cache:
            self._cache[name] = render_drum(name, self.sr)
        self._add("drums", beat * self.beat, self._cache[name], GAINS[name] * velocity)


def _velocity(rng: np.random.Generator, beat: float, total_beats: float, contour: str) -> float:
    accent = {0.0: 1.0, 2.0: 0.9}.get(beat % 4, 0.85 if beat % 1 == 0 else 0.6)
    x = beat / max(total_beats, 1.0)
    shape = {"steady": 1.0, "crescendo": 0.65 + 0.5 * x, "decrescendo": 1.15 - 0.5 * x}[contour]
    return accent * shape * float(rng.uniform(0.93, 1.07))


def _melody_rhythms(bpm: float) -> list[tuple[float, ...]]:
    plain = [(1, 1, 1, 1), (2, 1, 1), (1, 1, 2), (2, 2), (3, 1), (1, 2, 1)]
    if not _eighths_ok(bpm):
        return plain
    return plain + [(0.5, 0.5, 1, 1, 1), (1, 0.5, 0.5, 2), (1.5, 0.5, 1, 1), (0.5, 0.5, 0.5, 0.5, 2)]


def _compose(score: _Score, a: Mapping[str, Any], rng: np.random.Generator, total_beats: float) -> None:
    bpm, tonic, mode = a["tempo_bpm"], a["tonic"], a["mode"]
    chord_beats = 2 if bpm < 90 else 4
    n_slots = int(np.ceil(total_beats / chord_beats))
    prog = a["progression"]
    chords = [prog[i % len(prog)] for i in range(n_slots)]

    def vel(beat: float) -> float:
        return _velocity(rng, beat, total_beats, a["contour"])

    # Accompaniment: pads only when something else carries the beat.
    acc = a["accompaniment"]
    pad_ok = a["drums"] or a["bass"]
    style = {"strings": "pad", "organ": "pad" if pad_ok and rng.random() < 0.5 else "block",
             "piano": str(rng.choice(["block", "arpeggio"])), "guitar": str(rng.choice(["strum", "arpeggio"]))}[acc]
    step = 0.5 if (style == "arpeggio" and _eighths_ok(bpm)) else 1.0
    voicing = None
    for s, numeral in enumerate(chords):
        pcs = _chord_pitch_classes(numeral, tonic, mode)
        voicing = _voicing(pcs, voicing)
        b0 = s * chord_beats
        if style == "pad":
            for m in voicing:
                score.note("accompaniment", acc, m, b0, chord_beats, 0.8 * vel(b0))
            continue
        for j, beat in enumerate(np.arange(b0, b0 + chord_beats, step)):
            if style == "arpeggio":
                tones = voicing + [voicing[0] + 12]
                score.note("accompaniment", acc, tones[j % 4], beat, step, 1.3 * vel(beat))
            else:
                for v, m in enumerate(voicing):
                    offset = 0.012 * v / score.beat if style == "strum" else 0.0
                    score.note("accompaniment", acc, m, beat + offset, 0.6, vel(beat))

    # Bass: the chord root on every beat (sometimes the fifth on beat 3), in octave 2.
    if a["bass"]:
        for s, numeral in enumerate(chords):
            root = 36 + (_chord_pitch_classes(numeral, tonic, mode)[0] - 36) % 12
            for beat in np.arange(s * chord_beats, (s + 1) * chord_beats, 1.0):
                fifth = beat % 4 == 2 and rng.random() < 0.5
                score.note("bass", "synth bass", root + 7 * fifth, beat, 0.85, vel(beat))

    # Melody: a two-bar rhythmic motif (A B A B ...); chord tones on strong beats, steps between.
    lead = a["lead"]
    lo, hi = (67, 84) if lead in ("flute", "bells") else (60, 79)
    tonic_triad = _chord_pitch_classes("I" if mode == "major" else "i", tonic, mode)
    rhythms = _melody_rhythms(bpm)
    motif = [rhythms[int(rng.integers(len(rhythms)))] for _ in range(2)]
    pitch = _nearest(_chord_pitch_classes(chords[0], tonic, mode), (lo + hi) / 2, lo, hi)
    beat = 0.0
    bar = 0
    while beat < total_beats:
        for dur in motif[bar % 2]:
            slot = min(int(beat // chord_beats), n_slots - 1)
            numeral = chords[slot]
            chord_pcs = _chord_pitch_classes(numeral, tonic, mode)
            scale_pcs = _chord_scale(numeral, tonic, mode)
            if beat + dur >= total_beats:  # end on the tonic when the harmony allows it
                pitch = _nearest([tonic % 12] if tonic % 12 in chord_pcs else chord_pcs, pitch, lo, hi)
            elif beat % 2 == 0:  # strong beat: a chord tone, preferably one of the tonic triad
                home = [pc for pc in chord_pcs if pc in tonic_triad]
                pool = home if home and rng.random() < 0.7 else chord_pcs
                pitch = _nearest(pool, pitch + rng.integers(-4, 5), lo, hi)
            else:
                options = sorted(m for m in range(lo, hi + 1) if m % 12 in scale_pcs)
                i = options.index(_nearest(scale_pcs, pitch, lo, hi))
                i = int(np.clip(i + rng.choice([-1, 1, 1, -2, 2, 0]), 0, len(options) - 1))
                pitch = options[i]
            score.note("lead", lead, int(pitch), beat, dur * 0.95, vel(beat))
            beat += dur
        bar += 1

    if a["drums"]:
        _drums(score, a, rng, total_beats, vel)


def _drums(score: _Score, a: Mapping[str, Any], rng: np.random.Generator, total_beats: float,
           vel: Callable[[float], float]) -> None:
    pattern = DRUM_PATTERNS[drum_pattern(a)]
    if rng.random() < 0.5:
        score.drum("crash", 0.0, 0.9)
    for b0 in np.arange(0, total_beats, 4.0):
        for name, onsets in pattern.items():
            for k in onsets:
                accent = 0.8 if (name == "snare" and k % 2 == 0) else 1.0
                score.drum(name, b0 + k, accent * vel(b0 + k))


def _fast_len(n: int) -> int:
    """Smallest 2^a·3^b·5^c ≥ n (fast FFT sizes)."""
    best = 1 << int(np.ceil(np.log2(n)))
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _reverb(x: np.ndarray, sr: int, rng: np.random.Generator, rt60: float, wet: float) -> np.ndarray:
    """Convolution with exponentially decaying noise (a small room/hall), mixed `wet`."""
    n_ir = int(rt60 * sr)
    t = np.arange(n_ir) / sr
    ir = rng.standard_normal(n_ir) * np.exp(-6.9 * t / rt60)
    ir[: int(0.012 * sr)] = 0.0  # pre-delay
    ir /= np.sqrt(np.sum(ir**2))
    size = _fast_len(len(x) + n_ir - 1)
    tail = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[: len(x)]
    return ((1.0 - wet) * x + wet * tail).astype(np.float32)


def generate_clip(
    seed: int | np.random.Generator,
    duration_s: float = 10.0,
    sample_rate: int = 24000,
    attributes: Mapping[str, Any] | None = None,
) -> SyntheticClip:
    """One captioned clip; identical for the same seed. `attributes` may fix some of ATTRIBUTE_KEYS."""
    rng = np.random.default_rng(seed) if not isinstance(seed, np.random.Generator) else seed
    a = draw_attributes(rng, attributes)
    n = int(round(duration_s * sample_rate))
    bpm = float(a["tempo_bpm"])
    total_beats = duration_s * bpm / 60.0
    score = _Score(bpm, sample_rate, n)
    _compose(score, a, rng, total_beats)
    mix = np.zeros(n, np.float32)
    for buf in score.parts.values():
        mix += buf
    calm = tempo_band(bpm) == "slow"
    mix = _reverb(mix, sample_rate, rng, rt60=float(rng.uniform(0.8, 1.6) if calm else rng.uniform(0.4, 0.9)),
                  wet=float(rng.uniform(0.12, 0.25)))
    n_in, n_out = max(1, int(0.005 * sample_rate)), max(1, int(0.03 * sample_rate))
    mix[:n_in] *= np.linspace(0.0, 1.0, n_in, dtype=np.float32)
    mix[-n_out:] *= np.linspace(1.0, 0.0, n_out, dtype=np.float32)
    lo, hi = DYNAMICS[a["dynamics"]]
    peak = float(np.max(np.abs(mix))) or 1.0
    mix *= np.float32(rng.uniform(lo, hi) / peak)
    a["duration_s"] = float(duration_s)
    caption, tags = describe(a, rng)
    return SyntheticClip(mix, a, caption, tags)


def clip_seed(seed: int, index: int) -> np.random.Generator:
    """Clip `index` of dataset `seed`: independent of every other clip, so any subset is reproducible."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def synthetic_clips(
    num_clips: int, seed: int, duration_s: float = 10.0, sample_rate: int = 24000
) -> Iterator[tuple[int, SyntheticClip]]:
    """The dataset: (index, clip) for index in range(num_clips)."""
    for i in range(num_clips):
        yield i, generate_clip(clip_seed(seed, i), duration_s, sample_rate)


def synthetic_prompts(num_prompts: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """(caption, attributes) pairs drawn like the dataset's clips but without rendering audio: the
    prompts that evaluation can check generated audio against."""
    prompts = []
    for i in range(num_prompts):
        rng = clip_seed(seed, i)
        a = draw_attributes(rng)
        prompts.append((describe(a, rng)[0], a))
    return prompts
