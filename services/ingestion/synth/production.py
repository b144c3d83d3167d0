"""Production of a synthetic song: per-stem effects (Spotify's pedalboard) and mix-bus dynamics.

FluidSynth renders every part as a clean, dry General MIDI preset; a real record runs each part
through an amp, a compressor, an equaliser, modulation and a room, and the whole mix through a
bus compressor and a limiter. A network that has only heard the clean presets meets all of that
for the first time in a user's upload. Each stem here gets a random chain drawn from its own seeded
stream (same seed, same bytes) and the processed stem is the reference the network learns.

The bus is dynamics only, so it can be a gain curve: the curve is computed on the mix (a feed-forward
compressor on its short-term level, then a look-ahead peak limiter) and the same curve multiplies
every stem. The stems therefore still sum exactly to the processed mix, which a bus processed as a
whole and then split could not guarantee; what is lost is the bus' non-linear colour, which the
per-stem drive and compression already give.

`strength` (0 to 1) scales every amount (drive, EQ gains, compression ratios, wet levels, limiting);
the random draws do not depend on it, so two strengths give the same chain at other amounts, and 0
leaves the audio untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pedalboard as pb
from scipy.ndimage import minimum_filter1d, uniform_filter1d

ELECTRIC_GUITAR_PROGRAMS = range(26, 32)  # GM 27-32: jazz, clean, muted, overdriven, distortion, harmonics
BUS_BLOCK_SECONDS = 0.005  # the bus compressor's level is measured in blocks this long
LIMITER_LOOKAHEAD_SECONDS = 0.005


@dataclass
class StemChain:
    """One stem's effects, in order, and a description of each for the song's summary."""

    board: pb.Pedalboard
    effects: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class BusSettings:
    threshold_below_rms_db: float  # the compressor's threshold, below the mix's RMS level
    ratio: float
    attack_seconds: float
    release_seconds: float
    limit_db: float  # how far the limiter pulls the compressed mix's peaks down


def check_strength(strength: float) -> float:
    strength = float(strength)
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ValueError(f"production strength must be between 0 and 1, got {strength}")
    return strength


def stem_rng(seed: int, index: int, part: int) -> np.random.Generator:
    """The production stream of part `part` of song `index`, apart from the song's notes and timbre."""
    return np.random.default_rng([int(seed) % (1 << 64), int(index), int(part), 0x9D0C])


def bus_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % (1 << 64), int(index), 0xB05])


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def draw_stem_chain(
    rng: np.random.Generator, strength: float, program: int, is_drum: bool, rate: int,
    tempo_bpm: float, level_db: float,
) -> StemChain:
    """A random chain for one stem: amp and cabinet (electric guitars, half of them), EQ (every
    stem), compression, chorus, tempo-synced delay and a reverb of random size. `level_db` is the
    stem's RMS level, which the compressor's threshold is set against. Every draw is made whatever
    the strength and whether or not its effect is used, so the stream stays aligned."""
    s = check_strength(strength)
    nyquist = rate / 2
    d = {  # all draws, in a fixed order
        "drive": rng.random(), "drive_db": rng.uniform(10, 32), "cab_hp": rng.uniform(70, 160),
        "cab_lp": rng.uniform(2500, 6000), "cab_peak_hz": rng.uniform(900, 3000), "cab_peak_db": rng.uniform(2, 6),
        "low_hz": _log_uniform(rng, 60, 300), "low_db": rng.uniform(-6, 6),
        "mid_hz": _log_uniform(rng, 200, 5000), "mid_db": rng.uniform(-8, 8), "mid_q": rng.uniform(0.5, 3),
        "high_hz": _log_uniform(rng, 2500, 10000), "high_db": rng.uniform(-9, 6),
        "comp": rng.random(), "comp_below_db": rng.uniform(0, 12), "comp_ratio": rng.uniform(1.5, 8),
        "comp_attack": _log_uniform(rng, 1, 40), "comp_release": _log_uniform(rng, 40, 400),
        "chorus": rng.random(), "chorus_rate": rng.uniform(0.3, 2.0), "chorus_depth": rng.uniform(0.1, 0.4),
        "chorus_mix": rng.uniform(0.2, 0.5),
        "delay": rng.random(), "delay_beats": float(rng.choice([0.5, 0.75, 1.0])),
        "delay_feedback": rng.uniform(0.1, 0.45), "delay_mix": rng.uniform(0.1, 0.3),
        "reverb": rng.random(), "room": rng.uniform(0.1, 0.95), "damping": rng.uniform(0.2, 0.8),
        "wet": rng.uniform(0.05, 0.4), "width": rng.uniform(0.5, 1.0),
    }
    chain = StemChain(pb.Pedalboard([]))
    if s == 0.0:
        return chain

    def add(plugin, **description):
        chain.board.append(plugin)
        chain.effects.append({k: round(v, 3) if isinstance(v, float) else v for k, v in description.items()})

    melodic = not is_drum
    if melodic and program in ELECTRIC_GUITAR_PROGRAMS and d["drive"] < 0.5:
        add(pb.Distortion(drive_db=s * d["drive_db"]), effect="distortion", drive_db=s * d["drive_db"])
        # a guitar cabinet: no deep lows, no highs above a few kHz, a presence peak
        cutoff = nyquist * 0.95 + s * (min(d["cab_lp"], nyquist * 0.95) - nyquist * 0.95)
        low_cut = 20.0 + s * (d["cab_hp"] - 20.0)  # from 20 Hz: a cutoff near 0 Hz is not a stable filter
        add(pb.HighpassFilter(low_cut), effect="highpass", hz=low_cut)
        add(pb.LowpassFilter(cutoff), effect="lowpass", hz=cutoff)
        add(pb.PeakFilter(d["cab_peak_hz"], s * d["cab_peak_db"], 1.0), effect="peak", hz=d["cab_peak_hz"],
            gain_db=s * d["cab_peak_db"])
    add(pb.LowShelfFilter(d["low_hz"], s * d["low_db"]), effect="low shelf", hz=d["low_hz"], gain_db=s * d["low_db"])
    add(pb.PeakFilter(d["mid_hz"], s * d["mid_db"], d["mid_q"]), effect="peak", hz=d["mid_hz"],
        gain_db=s * d["mid_db"], q=d["mid_q"])
    high_hz = min(d["high_hz"], nyquist * 0.9)
    add(pb.HighShelfFilter(high_hz, s * d["high_db"]), effect="high shelf", hz=high_hz, gain_db=s * d["high_db"])
    if d["comp"] < 0.8:
        ratio, threshold = 1 + s * (d["comp_ratio"] - 1), level_db - d["comp_below_db"]
        add(pb.Compressor(threshold, ratio, d["comp_attack"], d["comp_release"]), effect="compressor",
            threshold_db=threshold, ratio=ratio, attack_ms=d["comp_attack"], release_ms=d["comp_release"])
    if melodic and d["chorus"] < 0.25:
        add(pb.Chorus(d["chorus_rate"], d["chorus_depth"], 7.0, 0.0, s * d["chorus_mix"]), effect="chorus",
            rate_hz=d["chorus_rate"], depth=d["chorus_depth"], mix=s * d["chorus_mix"])
    if melodic and d["delay"] < 0.2:
        seconds = d["delay_beats"] * 60.0 / tempo_bpm
        add(pb.Delay(seconds, d["delay_feedback"], s * d["delay_mix"]), effect="delay", seconds=seconds,
            feedback=d["delay_feedback"], mix=s * d["delay_mix"])
    if d["reverb"] < 0.7:
        add(pb.Reverb(d["room"], d["damping"], s * d["wet"], 1.0, d["width"]), effect="reverb",
            room_size=d["room"], damping=d["damping"], wet=s * d["wet"], width=d["width"])
    return chain


def rms_db(audio: np.ndarray) -> float:
    power = float(np.mean(np.square(audio, dtype=np.float64)))
    return 10 * math.log10(power) if power > 0 else -120.0


def process_stem(audio: np.ndarray, chain: StemChain, rate: int) -> np.ndarray:
    """`audio` (channels, samples) through the chain, at its former RMS level (make-up gain, as an
    engineer sets it, so the arrangement's balance stays the one composed)."""
    if not chain.board or not np.any(audio):
        return audio
    out = chain.board(np.ascontiguousarray(audio, dtype=np.float32), rate)
    before, after = rms_db(audio), rms_db(out)
    return (out * np.float32(10 ** ((before - after) / 20))).astype(np.float32)


def draw_bus(rng: np.random.Generator, strength: float) -> BusSettings:
    s = check_strength(strength)
    below, ratio = rng.uniform(0, 10), rng.uniform(1.5, 4)
    attack, release, limit = _log_uniform(rng, 0.005, 0.03), _log_uniform(rng, 0.05, 0.4), rng.uniform(1, 8)
    return BusSettings(below, 1 + s * (ratio - 1), attack, release, s * limit)


def bus_gain(mix: np.ndarray, rate: int, bus: BusSettings) -> np.ndarray:
    """The bus' gain per sample (samples,): a compressor on the mix's level in 5 ms blocks (threshold,
    ratio, attack and release smoothing), then a look-ahead limiter that pulls the compressed mix's
    peak down by `limit_db`, its gain never above what any sample in reach needs."""
    samples = mix.shape[-1]
    block = max(1, int(round(BUS_BLOCK_SECONDS * rate)))
    blocks = -(-samples // block)
    padded = np.zeros((mix.shape[0], blocks * block))
    padded[:, :samples] = mix
    level = 10 * np.log10(np.mean(np.square(padded).reshape(mix.shape[0], blocks, block), axis=(0, 2)) + 1e-12)
    threshold = rms_db(mix) - bus.threshold_below_rms_db
    target = -np.maximum(level - threshold, 0.0) * (1 - 1 / bus.ratio)  # gain reduction, dB (<= 0)
    a_att = math.exp(-block / (bus.attack_seconds * rate))
    a_rel = math.exp(-block / (bus.release_seconds * rate))
    smoothed, g = np.empty(blocks), 0.0
    for k, t in enumerate(target):  # deeper reduction follows at the attack's pace, recovery at the release's
        a = a_att if t < g else a_rel
        g = a * g + (1 - a) * t
        smoothed[k] = g
    centres = np.arange(blocks) * block + block / 2
    gain = 10 ** (np.interp(np.arange(samples), centres, smoothed) / 20)

    if bus.limit_db > 0:
        peaks = np.max(np.abs(mix), axis=0) * gain
        ceiling = peaks.max() * 10 ** (-bus.limit_db / 20)
        with np.errstate(divide="ignore"):
            needed = np.minimum(1.0, np.where(peaks > 0, ceiling / peaks, 1.0))
        reach = max(1, int(round(LIMITER_LOOKAHEAD_SECONDS * rate)))
        # every value averaged at sample i is a minimum over a window holding i, so the average is
        # never above what sample i needs: no peak passes the ceiling
        limited = minimum_filter1d(needed, 2 * reach + 1, mode="nearest")
        limited = np.minimum(uniform_filter1d(limited, reach + 1, mode="nearest"), needed)
        gain = gain * limited
    return gain.astype(np.float64)


def produce_song(
    stems: list[np.ndarray], chains: list[StemChain], bus: BusSettings, rate: int
) -> tuple[list[np.ndarray], dict]:
    """Every stem through its chain, then the bus' gain curve (computed on their sum) on each of them,
    so they still sum to the processed mix. Returns (stems, bus summary)."""
    processed = [process_stem(stem, chain, rate) for stem, chain in zip(stems, chains, strict=True)]
    mix = np.sum([p.astype(np.float64) for p in processed], axis=0)
    gain = bus_gain(mix, rate, bus)
    out = [(p * gain).astype(np.float32) for p in processed]
    summary = {
        "compressor_threshold_below_rms_db": round(bus.threshold_below_rms_db, 2),
        "compressor_ratio": round(bus.ratio, 3),
        "limit_db": round(bus.limit_db, 2),
        "max_gain_reduction_db": round(float(-20 * np.log10(gain.min())), 2) if gain.size else 0.0,
    }
    return out, summary
