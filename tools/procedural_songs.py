#!/usr/bin/env python3
"""Multitrack songs synthesised with numpy and scipy alone, in the MUSDB18-HQ folder layout.

A second way of making songs beside tools/gen_multitrack.py (General MIDI soundfonts through FluidSynth, espeak-ng
voices), in two families of instruments that share no sound source:

  synth     training songs: subtractive (band-limited saw or square through a low-pass), two-operator FM and
            additive organ voices; with `--bass varied`, bass lines of six patterns (roots, root-fifth-octave,
            walking, eighths, a repeated riff, held notes), an octave lower in some songs, on one of four more
            bass instruments (additive partials decaying each at its own rate, a filter sweep, an overdriven
            sine, a pulse); with `--other varied`, one or two parts a song (block chords, off-beat stabs,
            arpeggios, power chords, a lead melody; inversions, sevenths) on seven instruments (the three
            above, stretched-partial keys, struck bars and bells, a detuned-saw pad, an overdriven guitar);
            a swept-sine kick, noise snare and hi-hat, or with `--drums varied` a kit drawn a song (three
            kicks, noise snare, clap or tuned snare, noise or metallic hats, open hat, crash) playing one
            or two of five grooves, swung in some songs, with fills; a formant singer (glottal pulses
            through vowel resonators, with vibrato and consonant noise) or voices spoken by festival (eleven
            diphone, unit-selection and HTS speakers of seven languages, from Debian's festvox packages; none of
            them a flite speaker); a room reverb on every stem.
  holdout   evaluation songs only (scripts/generalisation.py): Karplus–Strong plucked strings and bass, tuned
            toms, clave and shaker, and voices *spoken* by flite (a diphone speech synthesiser no training song
            uses); dry, with other pans. Needs Debian's `flite`.

  python tools/procedural_songs.py OUT --tracks 100 --duration 30 --seed 5 [--family synth] [--subset train]
         [--vocals mix|sung|spoken] [--bass roots|varied] [--other chords|varied] [--drums eighths|varied]

Writes OUT/<subset>/proc_<family>_<seed>_<i>/{vocals,drums,bass,other,mixture}.wav (44.1 kHz stereo 16-bit,
mixture = the sum of the stems sample-exactly); song i of seed s is drawn from the generator seeded [s, i], so any
song can be rendered again alone. `render_song` returns the stems as arrays, for scripts that mix them themselves.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from scipy import signal

RATE = 44100
STEMS = ("vocals", "drums", "bass", "other")
FAMILIES = ("synth", "holdout")
VOCALS = ("mix", "sung", "spoken")  # the synth family's voices: the formant singer, festival speech, or either
BASS = ("roots", "varied")  # the synth family's bass: the chord's root on the beat (the first renders), or more
OTHER = ("chords", "varied")  # the synth family's other: arpeggios or held triads (the first renders), or more
DRUMS = ("eighths", "varied")  # its drums: kick, snare and hat on eighths (the first renders), or more
BASS_PATTERNS = ("roots", "root_fifth", "walking", "eighths", "riff", "held")
# Festival's speakers (Debian: festival festvox-kdlpc16k festvox-italp16k festvox-itapc16k festvox-ca-ona-hts
# festvox-czech-dita festvox-czech-machac festvox-czech-krb festvox-ru festvox-suopuhe-lj festvox-suopuhe-mv).
FESTIVAL_VOICES = ("ked_diphone", "lp_diphone", "pc_diphone", "upc_ca_ona_hts", "czech_dita", "czech_krb",
                   "czech_machac", "czech_ph", "hy_fi_mv_diphone", "suo_fi_lj_diphone", "msu_ru_nsh_clunits")
FLITE_VOICES = ("kal", "awb", "rms", "slt", "kal16")
FESTIVAL_VOICE_FOLDER = Path("/usr/share/festival/voices")  # Debian's: <language>/<speaker>
PROGRESSIONS = ([0, 4, 5, 3], [0, 5, 3, 4], [5, 3, 0, 4], [0, 3, 4, 4], [0, 2, 5, 4], [0, 3, 0, 4])
SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
# First three formants (Hz) of five vowels, an adult male voice (Peterson & Barney's averages, rounded).
VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240]])
WORDS = ("the night is long and the road is wide we walk along the river side under a sky of silver light "
         "every morning brings a new song hold my hand and never let it go the city sleeps while we are "
         "dreaming of the sea a thousand miles away from home tell me what you see when the lights go down").split()


def midi_hz(note) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(note, dtype=float) - 69) / 12)


def envelope(n: int, attack: float, release: float, sustain: float = 1.0, decay: float = 0.0) -> np.ndarray:
    """Attack, exponential decay towards `sustain`, release at the end; `n` samples."""
    t = np.arange(n) / RATE
    env = sustain + (1 - sustain) * np.exp(-t / decay) if decay > 0 else np.full(n, sustain)
    env *= np.minimum(1.0, t / max(attack, 1e-4))
    tail = min(n, int(release * RATE))
    if tail:
        env[n - tail:] *= np.linspace(1, 0, tail)
    return env


def harmonics(phase: np.ndarray, frequency: float, weight) -> np.ndarray:
    """Σ weight(k) sin(k·phase) over the harmonics below 10 kHz (band-limited: no aliasing)."""
    out = np.zeros_like(phase)
    for k in range(1, int(10000 / max(frequency, 20)) + 1):
        w = weight(k)
        if w:
            out += w * np.sin(k * phase)
    return out


def lowpass(x: np.ndarray, cutoff: float, order: int = 2) -> np.ndarray:
    return signal.sosfilt(signal.butter(order, min(cutoff, 0.45 * RATE), fs=RATE, output="sos"), x)


def highpass(x: np.ndarray, cutoff: float, order: int = 2) -> np.ndarray:
    return signal.sosfilt(signal.butter(order, cutoff, "highpass", fs=RATE, output="sos"), x)


def bandpass(x: np.ndarray, low: float, high: float, order: int = 2) -> np.ndarray:
    return signal.sosfilt(signal.butter(order, [low, min(high, 0.45 * RATE)], "bandpass", fs=RATE, output="sos"), x)


def decaying_partials(frequency: float, n: int, weight, stretch: float, rate) -> np.ndarray:
    """Σ weight(k) sin(2π k f √(1 + stretch k²) t) exp(−rate(k) t) over the partials below 8 kHz: a struck or plucked
    string, its partials slightly sharp of the harmonics (the string's stiffness), each decaying at its own rate."""
    t = np.arange(n) / RATE
    out = np.zeros(n)
    for k in range(1, int(8000 / frequency) + 1):
        out += weight(k) * np.sin(2 * np.pi * k * frequency * np.sqrt(1 + stretch * k * k) * t) * np.exp(-t * rate(k))
    return out


# ---- synth family: instruments ------------------------------------------------------------------------------------

def subtractive(frequency: float, n: int, rng) -> np.ndarray:
    phase = 2 * np.pi * frequency * np.arange(n) / RATE
    odd_only = rng.random() < 0.4  # square rather than saw
    wave = sum(harmonics(phase * (1 + detune), frequency, lambda k: (k % 2 or not odd_only) / k)
               for detune in (0.0, 0.004, -0.003)[: 1 + int(rng.integers(3))])
    return lowpass(wave, rng.uniform(2, 8) * frequency) * envelope(n, rng.uniform(0.005, 0.2), 0.05, 0.6, 0.3)


def fm(frequency: float, n: int, rng) -> np.ndarray:
    t = np.arange(n) / RATE
    ratio, depth = rng.choice([1.0, 2.0, 3.0, 3.5]), rng.uniform(1, 5)
    index = depth * np.exp(-t / rng.uniform(0.1, 0.6))
    return np.sin(2 * np.pi * frequency * t + index * np.sin(2 * np.pi * ratio * frequency * t)) \
        * envelope(n, 0.003, 0.05, 0.3, rng.uniform(0.2, 0.8))


def organ(frequency: float, n: int, rng) -> np.ndarray:
    t = np.arange(n) / RATE
    drawbars = {k: rng.uniform(0, 1) for k in (1, 2, 3, 4, 6, 8)}
    wave = harmonics(2 * np.pi * frequency * t, frequency, lambda k: drawbars.get(k, 0.0) / 2)
    return wave * (1 + 0.1 * np.sin(2 * np.pi * 6 * t)) * envelope(n, 0.01, 0.03)


def sub_bass(frequency: float, n: int, rng) -> np.ndarray:
    phase = 2 * np.pi * frequency * np.arange(n) / RATE
    return (np.sin(phase) + rng.uniform(0, 0.5) * np.sin(2 * phase)) * envelope(n, 0.005, 0.04, 0.7, 0.2)


def kick(n: int, rng) -> np.ndarray:
    t = np.arange(n) / RATE
    sweep = 45 + rng.uniform(60, 120) * np.exp(-t / 0.04)
    return np.sin(2 * np.pi * np.cumsum(sweep) / RATE) * np.exp(-t / rng.uniform(0.1, 0.3))


def snare(n: int, rng) -> np.ndarray:
    t = np.arange(n) / RATE
    noise = bandpass(rng.standard_normal(n), 1000, 7000) * np.exp(-t / rng.uniform(0.05, 0.15))
    return noise + 0.5 * np.sin(2 * np.pi * rng.uniform(170, 220) * t) * np.exp(-t / 0.05)


def hat(n: int, rng) -> np.ndarray:
    t = np.arange(n) / RATE
    return highpass(rng.standard_normal(n), 7000, 4) * np.exp(-t / rng.uniform(0.015, 0.06)) * 0.5


def sung_syllable(frequency: float, n: int, rng, formant_scale: float) -> np.ndarray:
    """A glottal pulse train (harmonics falling 12 dB an octave) with vibrato, through one vowel's three formant
    resonators, after a short consonant of noise."""
    t = np.arange(n) / RATE
    vibrato = 1 + 0.012 * np.sin(2 * np.pi * rng.uniform(4.5, 6.5) * t) * np.minimum(1, t / 0.3)
    phase = 2 * np.pi * np.cumsum(frequency * vibrato) / RATE
    source = harmonics(phase, frequency * 1.02, lambda k: 1 / k ** 2) + 0.02 * rng.standard_normal(n)
    formants = VOWELS[rng.integers(len(VOWELS))] * formant_scale
    voice = sum(bandpass(source, f * 0.9, f * 1.1) * gain for f, gain in zip(formants, (1.0, 0.6, 0.3)))
    voice *= envelope(n, 0.04, 0.08)
    if rng.random() < 0.6:
        consonant = min(n, int(rng.uniform(0.02, 0.08) * RATE))
        band = (3000, 9000) if rng.random() < 0.5 else (1000, 4000)
        voice[:consonant] += 0.3 * bandpass(rng.standard_normal(consonant), *band) * np.hanning(consonant)
    return voice


# ---- synth family, --bass varied: one instrument a song, its settings drawn once -----------------------------------

def partials_bass(rng):
    """Additive partials, each decaying at its own rate (higher ones faster) and slightly stretched, as a plucked
    or picked string's: from a round finger-style tone to a bright, clanky one."""
    slope, peak, decay, damping = rng.uniform(0.6, 2.0), rng.integers(2, 9), rng.uniform(0.2, 3.0), rng.uniform(0.1, 2)
    stretch = rng.uniform(0, 3e-4)

    def voice(frequency: float, n: int, rng) -> np.ndarray:
        partials = decaying_partials(frequency, n, lambda k: k ** -slope * (1 + 2 * np.exp(-0.5 * (k - peak) ** 2)),
                                     stretch, lambda k: decay + damping * k)
        return partials * envelope(n, rng.uniform(0.002, 0.01), 0.03)
    return voice


def swept_bass(rng):
    """A saw or square whose low-pass closes after each attack (bright to dark), with some drive: a synth bass."""
    odd_only, bright, dark = rng.random() < 0.5, rng.uniform(8, 30), rng.uniform(1.5, 4)
    sweep, drive = rng.uniform(0.03, 0.3), rng.uniform(1, 4)

    def voice(frequency: float, n: int, rng) -> np.ndarray:
        t = np.arange(n) / RATE
        wave = harmonics(2 * np.pi * frequency * t, frequency, lambda k: (k % 2 or not odd_only) / k)
        opening = np.exp(-t / sweep)
        wave = lowpass(wave, dark * frequency) * (1 - opening) + lowpass(wave, bright * frequency) * opening
        return np.tanh(drive * wave) * envelope(n, 0.003, 0.03, 0.8, 0.3)
    return voice


def driven_bass(rng):
    """A sine and its octave through a tanh overdrive, then a low-pass: from warm to fuzzy."""
    drive, octave, cutoff = rng.uniform(1.5, 8), rng.uniform(0, 0.6), rng.uniform(800, 4000)

    def voice(frequency: float, n: int, rng) -> np.ndarray:
        phase = 2 * np.pi * frequency * np.arange(n) / RATE
        return lowpass(np.tanh(drive * (np.sin(phase) + octave * np.sin(2 * phase))), cutoff) \
            * envelope(n, 0.005, 0.03, 0.7, 0.4)
    return voice


def pulse_bass(rng):
    """A band-limited pulse of a random width, two slightly detuned: hollow to nasal."""
    width, detune = rng.uniform(0.08, 0.5), rng.uniform(0, 0.006)

    def voice(frequency: float, n: int, rng) -> np.ndarray:
        phase = 2 * np.pi * frequency * np.arange(n) / RATE
        wave = sum(harmonics(phase * (1 + d), frequency, lambda k: np.sin(np.pi * k * width) / k) for d in (0, detune))
        return lowpass(wave, rng.uniform(4, 12) * frequency) * envelope(n, 0.004, 0.03, 0.75, 0.25)
    return voice


def bass_line(track: np.ndarray, rng, bars: int, beat: float, chords: list, degree) -> None:
    """Places a bass line on `track`: `chords[bar]` is the bar's chord (its root's scale step), `degree(step,
    octave)` a step's note. One pattern a song, or two taking turns every four bars."""
    voice = [partials_bass, swept_bass, driven_bass, pulse_bass][rng.integers(4)](rng)
    octave = -1 if rng.random() < 0.4 else 0
    patterns = rng.choice(BASS_PATTERNS, size=2)
    if rng.random() < 0.6:
        patterns[1] = patterns[0]
    riff = [None if rng.random() < 0.25 else int(rng.choice([0, 0, 0, 2, 4, 4, 7, -1, 5])) for _ in range(8)]
    legato = rng.uniform(0.4, 1.0)
    for bar in range(bars):
        chord, following = chords[bar], chords[(bar + 1) % len(chords)]
        pattern = patterns[bar // 4 % 2]
        if pattern == "roots":
            notes = [(position, chord, 1.0) for position in range(0, 4, int(rng.choice([1, 2])))]
        elif pattern == "root_fifth":
            notes = [(position, chord + step, 1.0) for position, step in enumerate((0, 4, 7, 4))]
        elif pattern == "walking":
            direction = 1 if following >= chord else -1
            notes = [(position, chord + direction * position, 1.0) for position in range(3)]
            notes.append((3, following - direction, 1.0))
        elif pattern == "eighths":
            notes = [(position / 2, chord + 7 * (rng.random() < 0.3), 0.5) for position in range(8)
                     if rng.random() > 0.15]
        elif pattern == "riff":
            notes = [(position / 2, chord + step, 0.5) for position, step in enumerate(riff) if step is not None]
        else:  # held
            notes = [(0, chord, 4.0)] if rng.random() < 0.5 else [(0, chord, 2.0), (2, chord + 4, 2.0)]
        for position, step, length in notes:
            sound = voice(midi_hz(degree(step, octave)), int(length * legato * beat * RATE), rng)
            place(track, (bar * 4 + position) * beat, sound, 0.5)


# ---- synth family, --other varied: one or two parts a song, each on its own instrument ---------------------------

def keys(rng):
    """Slightly stretched partials, the higher decaying faster, after a hammer's thump: upright to electric piano."""
    slope, sustain = rng.uniform(0.8, 2.0), rng.uniform(0.4, 3.0)
    stretch, thump = rng.uniform(1e-4, 8e-4), rng.uniform(0, 0.3)

    def voice(frequency: float, n: int, rng) -> np.ndarray:
        out = decaying_partials(frequency, n, lambda k: k ** -slope, stretch, lambda k: k / sustain)
        hit = min(n, int(0.01 * RATE))
        out[:hit] += thump * lowpass(rng.standard_normal(hit), 2000)
        return out * envelope(n, 0.002, 0.05)
    return voice


MALLET_MODES = ((1, 3.93, 9.17), (1, 4.0, 10.0), (1, 2.76, 5.40, 8.93))  # a marimba's, a vibraphone's bar, a bell


def mallet(rng):
    """A struck bar or bell: inharmonic modes, the higher decaying faster, in some songs a vibraphone's tremolo."""
    modes, ring = MALLET_MODES[rng.integers(len(MALLET_MODES))], rng.uniform(0.3, 2.0)
    tremolo, speed = rng.uniform(0, 0.5) * (rng.random() < 0.4), rng.uniform(4, 7)

    def voice(frequency: float, n: int, rng) -> np.ndarray:
        t = np.arange(n) / RATE
        out = sum(np.sin(2 * np.pi * ratio * frequency * t) * np.exp(-t * ratio / ring) / ratio
                  for ratio in modes if ratio * frequency < 12000)
        return out * (1 - tremolo * (0.5 + 0.5 * np.sin(2 * np.pi * speed * t))) * envelope(n, 0.001, 0.03)
    return voice


def pad(rng):
    """Detuned saws with vibrato through a low-pass, fading in: a synth pad or a string section."""
    count, spread, attack = int(rng.integers(3, 7)), rng.uniform(0.002, 0.01), rng.uniform(0.1, 0.8)
    cutoff, vibrato = rng.uniform(2, 8), rng.uniform(0, 0.005)

    def voice(frequency: float, n: int, rng) -> np.ndarray:
        t = np.arange(n) / RATE
        wobble = 1 + vibrato * np.sin(2 * np.pi * rng.uniform(4, 6) * t)
        # naive saws: their aliases fall mostly above the low-pass
        saws = sum(signal.sawtooth(2 * np.pi * np.cumsum(frequency * (1 + detune) * wobble) / RATE + rng.uniform(0, 6))
                   for detune in np.linspace(-spread, spread, count))
        return lowpass(saws / count, cutoff * frequency) * envelope(n, attack, 0.15)
    return voice


def driven_guitar(rng):
    """A saw and its octave through a tanh overdrive and a speaker's band-pass: crunch to fuzz, in some songs
    palm-muted (each note dying at once)."""
    drive, low, high, muted = rng.uniform(2, 12), rng.uniform(80, 200), rng.uniform(2500, 5000), rng.random() < 0.3

    def voice(frequency: float, n: int, rng) -> np.ndarray:
        phase = 2 * np.pi * frequency * np.arange(n) / RATE
        wave = signal.sawtooth(phase) + 0.5 * signal.sawtooth(2.003 * phase)
        return bandpass(np.tanh(drive * wave), low, high) * envelope(n, 0.003, 0.03, 0.02 if muted else 0.5, 0.1)
    return voice


OTHER_PATTERNS = ("block", "stabs", "arpeggio", "power", "lead")


def other_part(track: np.ndarray, rng, bars: int, beat: float, chords: list, degree, pattern: str) -> None:
    """Places one part of `pattern` on `track`, on an instrument drawn for it: block chords, off-beat stabs, an
    arpeggio, power chords in eighths, or a lead melody; chords voiced in an inversion, some with a seventh."""
    drawn = int(rng.integers(7))  # the four instruments above, or one of the chords' usual three
    voice = (keys, mallet, pad, driven_guitar)[drawn](rng) if drawn < 4 else (subtractive, fm, organ)[drawn - 4]
    offsets = [0, 2, 4, 6][: 3 + int(rng.random() < 0.3)]
    inversion = int(rng.integers(len(offsets)))
    offsets = offsets[inversion:] + [offset + 7 for offset in offsets[:inversion]]
    octave = int(rng.integers(2)) + (pattern == "lead")
    held = float(rng.choice([2.0, 4.0]))
    stabs = np.flatnonzero((rng.random(8) < 0.5) | (np.arange(8) == 1)) / 2  # at least the "and" of one
    arpeggio_step, order = float(rng.choice([0.5, 0.25])), rng.choice(["up", "down", "up_down", "random"])
    melody = 4  # the lead's scale step, walking from the third of the song's key
    for bar in range(bars):
        chord, start = chords[bar], bar * 4 * beat
        notes = [degree(chord + offset, octave) for offset in offsets]
        if pattern == "block":
            hits = [(position, note, held) for position in np.arange(0, 4, held) for note in notes]
        elif pattern == "stabs":
            hits = [(position, note, 0.4) for position in stabs for note in notes]
        elif pattern == "arpeggio":
            sequence = {"up": notes, "down": notes[::-1], "up_down": notes + notes[-2:0:-1],
                        "random": list(rng.permutation(notes))}[str(order)]
            hits = [(i * arpeggio_step, sequence[i % len(sequence)], 1.5 * arpeggio_step)
                    for i in range(int(4 / arpeggio_step))]
        elif pattern == "power":
            bottom = degree(chord, octave - 1)  # root, fifth and octave, in semitones
            hits = [(i / 2, note, 0.5) for i in range(8) if rng.random() > 0.2
                    for note in (bottom, bottom + 7, bottom + 12)]
        else:  # lead: a walk over the scale near the chord, with rests
            hits = []
            for position in np.arange(0, 4, float(rng.choice([0.5, 1.0]))):
                melody = int(np.clip(melody + rng.integers(-2, 3), chord - 3, chord + 9))
                if rng.random() < 0.75:
                    hits.append((position, degree(melody, octave), 0.9))
        for position, note, length in hits:
            place(track, start + position * beat, voice(midi_hz(note), int(length * beat * RATE), rng), 0.25)


def other_parts(track: np.ndarray, rng, bars: int, beat: float, chords: list, degree) -> None:
    """The `other` stem: one part, or in 40 % of songs a second (a lead over chords, or two accompaniments)."""
    other_part(track, rng, bars, beat, chords, degree, str(rng.choice(OTHER_PATTERNS[:4])))
    if rng.random() < 0.4:
        second = np.zeros_like(track)
        other_part(second, rng, bars, beat, chords, degree, str(rng.choice(OTHER_PATTERNS[2:])))
        track += rng.uniform(0.4, 1.0) * second


# ---- synth family, --drums varied: a kit and one or two grooves a song ---------------------------------------------

def boom_kick(n: int, rng) -> np.ndarray:
    """A long, low sine sweeping down to 40-60 Hz, overdriven: an 808's kick, deep in the bass's register."""
    t = np.arange(n) / RATE
    pitch = rng.uniform(40, 60) * (1 + 2 * np.exp(-t / 0.03))
    drive = rng.uniform(1, 4)
    tone = np.tanh(drive * np.sin(2 * np.pi * np.cumsum(pitch) / RATE)) / np.tanh(drive)
    return tone * np.exp(-t / rng.uniform(0.2, 0.45))


def click_kick(n: int, rng) -> np.ndarray:
    """The swept kick with a beater's click: a few ms of high-passed noise."""
    out = kick(n, rng)
    click = int(0.004 * RATE)
    out[:click] += rng.uniform(0.3, 1) * bandpass(rng.standard_normal(click), 2000, 8000) * np.hanning(click)
    return out


def clap(n: int, rng) -> np.ndarray:
    """Three or four bursts of band-passed noise 8-15 ms apart, then a short tail: hands clapping together."""
    t = np.arange(n) / RATE
    gap = rng.uniform(0.008, 0.015)
    bursts = sum(np.exp(-np.clip(t - i * gap, 0, None) / 0.004) * (t >= i * gap)
                 for i in range(int(rng.integers(3, 5))))
    tail = np.exp(-t / rng.uniform(0.08, 0.2))
    return bandpass(rng.standard_normal(n), rng.uniform(800, 1200), rng.uniform(2500, 5000)) * np.maximum(bursts, tail)


def tuned_snare(n: int, rng) -> np.ndarray:
    """A drum head's two lowest modes and the wires' high-passed rattle, decaying separately."""
    t = np.arange(n) / RATE
    head = rng.uniform(160, 260)
    body = (np.sin(2 * np.pi * head * t) + 0.6 * np.sin(2 * np.pi * 1.59 * head * t)) \
        * np.exp(-t / rng.uniform(0.04, 0.1))
    wires = highpass(rng.standard_normal(n), rng.uniform(2000, 4000)) * np.exp(-t / rng.uniform(0.08, 0.25))
    return 0.6 * body + rng.uniform(0.4, 1.0) * wires


def metal(n: int, rng, decay: float) -> np.ndarray:
    """Six square waves at inharmonic ratios, high-passed (an 808's hi-hat and cymbals), decaying over `decay` s."""
    t = np.arange(n) / RATE
    base = rng.uniform(280, 420)
    squares = sum(signal.square(2 * np.pi * base * ratio * t) for ratio in (1, 1.48, 1.80, 2.55, 2.63, 3.90))
    return 0.15 * highpass(squares, rng.uniform(5000, 8000), 4) * np.exp(-t / decay)


def crash(n: int, rng) -> np.ndarray:
    """The metallic squares ringing on, over a burst of bright noise at the hit."""
    t = np.arange(n) / RATE
    noise = highpass(rng.standard_normal(n), 3000) * np.exp(-t / rng.uniform(0.2, 0.5))
    return metal(n, rng, rng.uniform(0.5, 0.9)) * (1 + 2 * np.exp(-t / 0.03)) + 0.1 * noise


def drum_kit(rng) -> dict:
    """A kit drawn once a song, {name: three takes}: each sound is rendered three times and the takes reused, as a
    sampled kit's round robin (each long enough to ring out, with a fade against a click where it is cut)."""
    kick_sound = (kick, boom_kick, click_kick)[rng.integers(3)]
    snare_sound = (snare, clap, tuned_snare)[rng.integers(3)]
    metallic = rng.random() < 0.5
    closed, opened = rng.uniform(0.02, 0.06), rng.uniform(0.15, 0.4)
    sounds = {"kick": lambda: kick_sound(int(1.2 * RATE), rng), "snare": lambda: snare_sound(int(0.8 * RATE), rng),
              "hat": lambda: metal(int(0.2 * RATE), rng, closed) if metallic else hat(int(0.2 * RATE), rng),
              "open": lambda: metal(int(1.2 * RATE), rng, opened), "crash": lambda: crash(int(2.5 * RATE), rng)}
    return {name: [take * envelope(take.size, 0, 0.03) for take in (make() for _ in range(3))]
            for name, make in sounds.items()}


DRUM_GROOVES = {  # sixteenth-note steps of a bar: kick, snare, closed hat, open hat
    "rock": ((0, 8), (4, 12), tuple(range(0, 16, 2)), ()),
    "four_on_the_floor": ((0, 4, 8, 12), (4, 12), (0, 4, 8, 12), (2, 6, 10, 14)),
    "half_time": ((0, 3, 10), (8,), tuple(range(0, 16, 2)), ()),
    "breakbeat": ((0, 3, 10), (4, 12), tuple(range(16)), ()),
    "sparse": ((0, 11), (12,), (0, 6, 8, 14), (4,)),
}


def drum_part(track: np.ndarray, rng, bars: int, beat: float) -> None:
    """Places a drum part on `track`: one groove, or two taking turns every four bars, a few kicks more or less, some
    songs swung, a crash on each eight bars' downbeat and a snare fill ending half the four-bar phrases."""
    kit = drum_kit(rng)
    grooves = rng.choice(list(DRUM_GROOVES), size=2)
    swing = rng.uniform(0.1, 0.33) if rng.random() < 0.3 else 0.0  # off-beat sixteenths late by this share of a step
    for bar in range(bars):
        kicks, snares, closed, opened = DRUM_GROOVES[grooves[bar // 4 % 2]]
        hits = [("kick", step) for step in range(16) if (step in kicks) != (rng.random() < 0.05)]
        hits += [("snare", step) for step in snares] + [("hat", step) for step in closed if rng.random() < 0.9]
        hits += [("open", step) for step in opened] + [("crash", 0)] * (bar % 8 == 0)
        if bar % 4 == 3 and rng.random() < 0.5:
            hits += [("snare", step) for step in range(int(rng.choice([8, 12])), 16)]
        for name, step in hits:
            position = (bar * 16 + step + swing * (step % 2)) * beat / 4
            gain = 0.6 * rng.uniform(0.6, 1.0) * (1.0 if step % 4 == 0 else 0.8)
            place(track, position, kit[name][rng.integers(3)], gain)


# ---- holdout family: instruments ----------------------------------------------------------------------------------

def pluck(frequency: float, n: int, rng, brightness: float = 1.0) -> np.ndarray:
    """Karplus–Strong: a noise burst circulating in a delay line of one period, averaged (damped) each pass."""
    period = max(2, int(round(RATE / frequency)))
    burst = np.zeros(n)
    excitation = lowpass(rng.uniform(-1, 1, period), brightness * rng.uniform(2000, 8000))
    burst[:period] = excitation - excitation.mean()  # no DC: the loop would hold it for seconds
    feedback = np.zeros(period + 2)
    feedback[0], feedback[period], feedback[period + 1] = 1.0, -0.495, -0.495  # a loss of 1 % a pass
    return signal.lfilter([1.0], feedback, burst) * envelope(n, 0.001, 0.02)


def tom(n: int, rng) -> np.ndarray:
    t = np.arange(n) / RATE
    pitch = rng.uniform(80, 220) * (1 + 0.2 * np.exp(-t / 0.02))
    return np.sin(2 * np.pi * np.cumsum(pitch) / RATE) * np.exp(-t / rng.uniform(0.08, 0.2))


def clave(n: int, rng) -> np.ndarray:
    t = np.arange(n) / RATE
    return 0.6 * np.sin(2 * np.pi * rng.uniform(2000, 3000) * t) * np.exp(-t / 0.012)


def shaker(n: int, rng) -> np.ndarray:
    t = np.arange(n) / RATE
    return 0.4 * bandpass(rng.standard_normal(n), 4000, 10000) * np.sin(np.pi * np.minimum(t / 0.07, 1))


def voice_installed(voice: str) -> bool:
    if voice in FLITE_VOICES:  # flite's speakers are built into it
        return shutil.which("flite") is not None
    return shutil.which("text2wave") is not None and any(FESTIVAL_VOICE_FOLDER.glob(f"*/{voice}"))


def spoken_phrase(words: int, rng, voice: str) -> np.ndarray:
    """`voice` (a FLITE_VOICES or FESTIVAL_VOICES speaker) speaking `words` random words, at 44.1 kHz."""
    import soundfile
    import soxr

    engine = "flite" if voice in FLITE_VOICES else "text2wave"
    if not voice_installed(voice):
        packages = "flite" if engine == "flite" else "festival and the festvox packages in tools/procedural_songs.py"
        raise SystemExit(f"voice {voice} is not installed: apt-get install {packages}")
    text = " ".join(rng.choice(WORDS, size=words))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "phrase.wav")
        command = (["flite", "-voice", voice, "-t", text, "-o", path] if engine == "flite"
                   else ["text2wave", "-eval", f"(voice_{voice})", "-o", path])
        subprocess.run(command, input=None if engine == "flite" else text, text=True, check=True,
                       capture_output=True)
        audio, rate = soundfile.read(path, dtype="float64", always_2d=True)
    return soxr.resample(audio[:, 0], rate, RATE)


# ---- composition ------------------------------------------------------------------------------------------------

def place(track: np.ndarray, start: float, sound: np.ndarray, gain: float = 1.0) -> None:
    first = int(start * RATE)
    if first < len(track):
        end = min(len(track), first + len(sound))
        track[first:end] += gain * sound[: end - first]


def pan(mono: np.ndarray, position: float) -> np.ndarray:
    """Constant-power pan, position in [−1, 1] (left to right): (2, n)."""
    angle = (position + 1) * np.pi / 4
    return np.stack([np.cos(angle) * mono, np.sin(angle) * mono])


def reverb(stereo: np.ndarray, rng) -> np.ndarray:
    """A room: each channel convolved with its own exponentially decaying noise, mixed in at random wetness."""
    seconds = rng.uniform(0.3, 1.2)
    t = np.arange(int(seconds * RATE)) / RATE
    wet = rng.uniform(0.05, 0.25)
    tails = [signal.fftconvolve(channel, rng.standard_normal(t.size) * np.exp(-6.9 * t / seconds))[: channel.size]
             for channel in stereo]
    tails = np.stack(tails)
    return stereo + wet * tails * np.sqrt(np.mean(stereo ** 2) / max(np.mean(tails ** 2), 1e-12))


def render_song(family: str, seed: int, index: int, duration: float, vocals: str = "mix", bass: str = "roots",
                other: str = "chords", drums: str = "eighths") -> dict:
    """The four stems of song `index` of `seed`, {stem: float64 (2, samples)}, before any level normalisation.
    `vocals`, `bass`, `other` and `drums` choose the synth family's parts (the holdout family's are always flite's
    speech, plucked roots and chords, and its percussion on eighths)."""
    if family == "holdout" and (bass, other, drums) != (BASS[0], OTHER[0], DRUMS[0]):
        raise ValueError("the holdout family's bass, other and drums are always its own (the first choices)")
    rng = np.random.default_rng([seed, index, FAMILIES.index(family)])
    # its own generator, so that a sung song is the same whichever `vocals` chose it
    voice_rng = np.random.default_rng([seed, index, 7])
    if vocals == "mix":
        vocals = "sung" if voice_rng.random() < 0.5 else "spoken"
    n = int(duration * RATE)
    beat = 60 / rng.uniform(80, 150)
    scale = SCALES[rng.choice(list(SCALES))]
    root = int(rng.integers(40, 52))  # bass register, E2 to D#3
    progression = PROGRESSIONS[rng.integers(len(PROGRESSIONS))]
    bars = int(np.ceil(duration / (4 * beat)))

    def degree(step: int, octave: int = 0) -> int:
        return root + 12 * (octave + step // 7) + scale[step % 7]

    mono = {stem: np.zeros(n) for stem in STEMS}
    if family == "synth":
        chord_voice = [subtractive, fm, organ][rng.integers(3)]
        bass_voice = [subtractive, fm, sub_bass][rng.integers(3)]
        drum_voices = {"kick": kick, "snare": snare, "hat": hat}
    else:
        brightness = rng.uniform(0.5, 1.5)

        def chord_voice(frequency, length, generator):
            return pluck(frequency, length, generator, brightness)

        def bass_voice(frequency, length, generator):
            return pluck(frequency, length, generator, 0.2)
        drum_voices = {"kick": tom, "snare": clave, "hat": shaker}
    arpeggio = rng.random() < 0.5
    chords = [progression[bar % len(progression)] for bar in range(bars)]  # each bar's chord (its root's step)
    for bar in range(bars):
        chord = chords[bar]
        start = bar * 4 * beat
        notes = [degree(chord + offset, 1) for offset in (0, 2, 4)]
        if other == "chords" and arpeggio:
            for step in range(8):
                note = notes[step % 3] + 12 * (step // 3 % 2)
                place(mono["other"], start + step * beat / 2, chord_voice(midi_hz(note), int(beat * RATE), rng), 0.3)
        elif other == "chords":
            for note in notes:
                place(mono["other"], start, chord_voice(midi_hz(note), int(4 * beat * RATE), rng), 0.25)
        if bass == "roots":
            for step in range(0, 4, 1 if rng.random() < 0.5 else 2):
                place(mono["bass"], start + step * beat, bass_voice(midi_hz(degree(chord)), int(beat * RATE), rng),
                      0.5)
        for step in range(8 if drums == "eighths" else 0):  # the varied drums come after the loop
            hit = [name for name, on in (("kick", step in (0, 4) or rng.random() < 0.1),
                                         ("snare", step in (2, 6)), ("hat", rng.random() < 0.8)) if on]
            for name in hit:
                place(mono["drums"], start + step * beat / 2, drum_voices[name](int(0.4 * RATE), rng), 0.6)
    # each varied part draws from its own generator, after the rest, so that the first choices render as they did
    if bass == "varied":
        bass_line(mono["bass"], np.random.default_rng([seed, index, 11]), bars, beat, chords, degree)
    if other == "varied":
        other_parts(mono["other"], np.random.default_rng([seed, index, 12]), bars, beat, chords, degree)
    if drums == "varied":
        drum_part(mono["drums"], np.random.default_rng([seed, index, 13]), bars, beat)
    vocal_bars = rng.random(bars) < rng.uniform(0.4, 0.9)
    if family == "synth" and vocals == "sung":
        formant_scale = rng.choice([1.0, 1.17])  # male or female vocal tract
        octave = 1 if formant_scale == 1.0 else 2
        for bar in np.flatnonzero(vocal_bars):
            step_beats = rng.choice([0.5, 1.0])
            for position in np.arange(0, 4, step_beats):
                if rng.random() < 0.85:
                    note = degree(progression[bar % len(progression)] + int(rng.integers(-2, 5)), octave)
                    syllable = sung_syllable(midi_hz(note), int(step_beats * beat * RATE * 0.95), rng, formant_scale)
                    place(mono["vocals"], (bar * 4 + position) * beat, syllable)
    elif family == "synth":
        voice = str(voice_rng.choice(FESTIVAL_VOICES))
        for bar in np.flatnonzero(vocal_bars[::2]) * 2:
            place(mono["vocals"], bar * 4 * beat + voice_rng.uniform(0, beat),
                  spoken_phrase(int(voice_rng.integers(4, 9)), voice_rng, voice))
    else:
        voice = str(rng.choice(FLITE_VOICES))
        vocal_bars[0] = True  # every evaluation song has a voice
        for bar in np.flatnonzero(vocal_bars[::2]) * 2:
            place(mono["vocals"], bar * 4 * beat + rng.uniform(0, beat), spoken_phrase(int(rng.integers(4, 9)), rng,
                                                                                       voice))
    positions = {"vocals": 0.0, "drums": rng.uniform(-0.2, 0.2), "bass": 0.0, "other": rng.uniform(-0.6, 0.6)}
    stems = {}
    for stem in STEMS:
        level = np.sqrt(np.mean(mono[stem] ** 2))
        stereo = pan(mono[stem] / level * 0.1 if level > 0 else mono[stem], positions[stem])
        stems[stem] = reverb(stereo, rng) if family == "synth" and level > 0 else stereo
    return stems


def write_song(folder: Path, stems: dict, rng) -> None:
    """16-bit stems at random levels (peak of the mixture at most −1 dBFS), and their exact sum as the mixture."""
    import soundfile

    gains = {stem: 10 ** (rng.uniform(-6, 3) / 20) for stem in STEMS}
    peak = np.max(np.abs(sum(gains[stem] * stems[stem] for stem in STEMS)))
    scale = 0.89 / max(peak, 1e-9)
    quantised = {stem: np.round(np.clip(gains[stem] * scale * stems[stem], -1, 1) * 32767).astype(np.int32)
                 for stem in STEMS}
    mixture = sum(quantised.values())
    folder.mkdir(parents=True, exist_ok=True)
    for stem, audio in {**quantised, "mixture": np.clip(mixture, -32768, 32767)}.items():
        soundfile.write(folder / f"{stem}.wav", audio.T.astype(np.int16), RATE, subtype="PCM_16")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--tracks", type=int, default=4)
    parser.add_argument("--first", type=int, default=0, help="index of the first song (to add songs to a set)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per song")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, default="synth")
    parser.add_argument("--subset", default="train")
    parser.add_argument("--vocals", choices=VOCALS, default="mix", help="the synth family's voices (default: mix)")
    parser.add_argument("--bass", choices=BASS, default="roots", help="the synth family's bass lines (default: roots)")
    parser.add_argument("--other", choices=OTHER, default="chords", help="the synth family's other (default: chords)")
    parser.add_argument("--drums", choices=DRUMS, default="eighths", help="the synth family's drums (default: eighths)")
    args = parser.parse_args(argv)
    for index in range(args.first, args.first + args.tracks):
        name = f"proc_{args.family}_{args.seed}_{index:05d}"
        folder = Path(args.out) / args.subset / name
        if (folder / "mixture.wav").exists():
            continue
        stems = render_song(args.family, args.seed, index, args.duration, args.vocals, args.bass, args.other,
                            args.drums)
        write_song(folder, stems, np.random.default_rng([args.seed, index, 99]))
        print(f"{name}: ok", flush=True)


if __name__ == "__main__":
    main()
