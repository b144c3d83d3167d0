"""Production of synthetic songs (services.ingestion.synth.production): each drawn effect does to a
stem what it should, the bus' shared gain keeps the stems summing to the mix, a song is the same
bytes from the same seed, and a bad strength is refused by the service."""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pedalboard as pb
import pytest
import soundfile as sf
import yaml

from services.common.errors import InvalidArgumentError
from services.ingestion.synth import generate_songs
from services.ingestion.synth.production import (
    BusSettings,
    StemChain,
    bus_gain,
    bus_rng,
    draw_bus,
    draw_stem_chain,
    process_stem,
    produce_song,
    rms_db,
    stem_rng,
)
from stemlab.v1 import ingestion_pb2, ingestion_pb2_grpc
from tests.servicetools import ServiceProcess, run_cli

RATE = 22050


def _tone(hz: float, seconds: float, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return np.tile(level * np.sin(2 * np.pi * hz * t), (2, 1)).astype(np.float32)


def _drawn(effect: str, program: int = 29, is_drum: bool = False, level_db: float = -20.0):
    """The first drawn chain (over songs of seed 1) that holds `effect`, and that effect alone."""
    for index in range(200):
        chain = draw_stem_chain(stem_rng(1, index, 0), 1.0, program, is_drum, RATE, 120.0, level_db)
        for plugin, row in zip(chain.board, chain.effects, strict=True):
            if row["effect"] == effect:
                return chain, StemChain(pb.Pedalboard([plugin]), [row])
    raise AssertionError(f"no chain drew {effect}")


def _band_energy(audio: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(audio[0])) ** 2
    hz = np.fft.rfftfreq(audio.shape[1], 1 / RATE)
    return float(spectrum[(hz >= low) & (hz < high)].sum())


def _crest_db(audio: np.ndarray) -> float:
    return 20 * math.log10(float(np.abs(audio).max())) - rms_db(audio)


def test_distortion_adds_harmonics_and_the_cabinet_cuts_the_highs():
    _, drive = _drawn("distortion")
    tone = _tone(220.0, 1.0)
    out = process_stem(tone, drive, RATE)
    before = _band_energy(tone, 600, 700) / _band_energy(tone, 200, 240)  # 3rd harmonic over fundamental
    after = _band_energy(out, 600, 700) / _band_energy(out, 200, 240)
    assert after > 100 * before and after > 1e-3
    assert rms_db(out) == pytest.approx(rms_db(tone), abs=0.01)  # make-up gain keeps the level
    chain, lowpass = _drawn("lowpass")
    noise = np.random.default_rng(0).normal(0, 0.1, (2, RATE)).astype(np.float32)
    cut = lowpass.board(noise, RATE)
    assert lowpass.effects[0]["hz"] < 6500
    assert _band_energy(cut, 9000, 11000) < 0.05 * _band_energy(noise, 9000, 11000)
    # only electric guitars go through an amp
    for index in range(100):
        for program, drum in ((0, False), (25, False), (0, True)):
            chain = draw_stem_chain(stem_rng(1, index, 0), 1.0, program, drum, RATE, 120.0, -20.0)
            assert "distortion" not in [row["effect"] for row in chain.effects]


def test_reverb_lengthens_the_decay_and_compression_narrows_the_dynamics():
    _, reverb = _drawn("reverb")
    burst = np.zeros((2, 2 * RATE), np.float32)
    burst[:, : RATE // 10] = _tone(440.0, 0.1)
    out = process_stem(burst, reverb, RATE)
    tail = slice(RATE // 10 + RATE // 20, RATE // 2)  # 50 to 400 ms after the burst stops
    assert rms_db(out[:, tail]) > rms_db(burst[:, tail]) + 60

    # quiet and loud passages, the threshold below the loud ones: the loud ones come down
    _, compressor = _drawn("compressor", level_db=-20.0)
    loud_quiet = np.concatenate([_tone(330.0, 0.5, 0.5), _tone(330.0, 0.5, 0.02)] * 2, axis=1)
    squeezed = compressor.board(loud_quiet, RATE)
    assert compressor.effects[0]["ratio"] > 1.5

    def loud_over_quiet_db(audio):  # the last 300 ms of the second loud and quiet passages: past the attack
        return rms_db(audio[:, int(1.2 * RATE) : int(1.5 * RATE)]) - rms_db(audio[:, int(1.7 * RATE) : 2 * RATE])

    assert loud_over_quiet_db(squeezed) < loud_over_quiet_db(loud_quiet) - 3.0


def test_every_stem_gets_an_equaliser_and_strength_scales_the_same_draws():
    full = draw_stem_chain(stem_rng(7, 3, 2), 1.0, 27, False, RATE, 100.0, -20.0)
    half = draw_stem_chain(stem_rng(7, 3, 2), 0.5, 27, False, RATE, 100.0, -20.0)
    names = [row["effect"] for row in full.effects]
    assert {"low shelf", "peak", "high shelf"} <= set(names)
    assert names == [row["effect"] for row in half.effects]
    for a, b in zip(full.effects, half.effects, strict=True):
        for key in ("gain_db", "drive_db", "wet", "mix"):
            if key in a:
                assert b[key] == pytest.approx(a[key] / 2, abs=0.002)
    assert not draw_stem_chain(stem_rng(7, 3, 2), 0.0, 27, False, RATE, 100.0, -20.0).board
    tone = _tone(196.0, 0.5)
    for s in (1e-6, 0.01):  # the faintest production still gives finite audio, close to the input
        for index in range(20):
            chain = draw_stem_chain(stem_rng(7, index, 0), s, 29, False, RATE, 100.0, -20.0)
            out = process_stem(tone, chain, RATE)
            assert np.all(np.isfinite(out)) and rms_db(out - tone) < rms_db(tone) - 10
    with pytest.raises(ValueError):
        draw_stem_chain(stem_rng(7, 3, 2), 1.5, 27, False, RATE, 100.0, -20.0)


def test_the_bus_gain_limits_the_mix_and_the_stems_still_sum_to_it():
    rng = np.random.default_rng(5)
    stems = [_tone(hz, 2.0, 0.2) * rng.uniform(0.2, 1.0, 2 * RATE).astype(np.float32) for hz in (110, 440, 1320)]
    stems.append(np.zeros_like(stems[0]))
    stems[0][:, RATE // 2 : RATE // 2 + 200] *= 4  # a transient for the limiter
    chains = [StemChain(pb.Pedalboard([])) for _ in stems]
    bus = BusSettings(threshold_below_rms_db=3.0, ratio=3.0, attack_seconds=0.01, release_seconds=0.1, limit_db=6.0)
    produced, summary = produce_song(stems, chains, bus, RATE)
    mix_before = np.sum(stems, axis=0)
    mix_after = np.sum(produced, axis=0)
    gain = bus_gain(mix_before.astype(np.float64), RATE, bus)
    assert np.all(gain <= 1.0 + 1e-12) and summary["max_gain_reduction_db"] >= 6.0
    np.testing.assert_allclose(mix_after, mix_before * gain, atol=1e-6)  # one gain for every stem
    # the compressed mix's peak came down by the limit, its crest factor with it
    compressed_peak = float(np.abs(mix_before).max(axis=0).max())
    assert float(np.abs(mix_after).max()) <= compressed_peak * 10 ** (-6.0 / 20) + 1e-6
    assert _crest_db(mix_after) < _crest_db(mix_before) - 3.0
    assert not np.any(produced[3])


def test_produced_songs_are_reproducible_recorded_and_sum_to_their_mix(tmp_path):
    first = generate_songs(tmp_path / "a", 1, 8, seed=4, rate=RATE, produce=1.0)
    generate_songs(tmp_path / "b", 1, 8, seed=4, rate=RATE, produce=1.0)
    plain = generate_songs(tmp_path / "c", 1, 8, seed=4, rate=RATE)
    assert first["produce"] == 1.0 and plain["produce"] == 0.0
    song = first["songs"][0]
    assert song["production"]["strength"] == 1.0 and song["production"]["bus"]["limit_db"] > 0
    assert all(row["production"] for row in song["stems"]) and "production" not in plain["songs"][0]
    folder_a, folder_b, folder_c = (tmp_path / d / song["name"] for d in "abc")
    files = sorted(p.relative_to(folder_a) for p in folder_a.rglob("*.wav"))
    assert files and all((folder_a / f).read_bytes() == (folder_b / f).read_bytes() for f in files)
    assert any((folder_a / f).read_bytes() != (folder_c / f).read_bytes() for f in files)
    stems = [sf.read(folder_a / row["file"], always_2d=True)[0] for row in song["stems"]]
    mix, _ = sf.read(folder_a / song["mix"], always_2d=True)
    np.testing.assert_allclose(np.sum(stems, axis=0), mix, atol=1e-3)  # 16-bit files
    metadata = yaml.safe_load(next(folder_a.glob("*_METADATA.yaml")).read_text())
    assert "production 1" in metadata["origin"]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidArgumentError, match="production strength"):
            generate_songs(tmp_path / "bad", 1, 8, seed=4, rate=RATE, produce=bad)
    assert draw_bus(bus_rng(4, 0), 1.0) == draw_bus(bus_rng(4, 0), 1.0)


def test_the_service_generates_produced_songs_and_refuses_a_bad_strength(tmp_path):
    with ServiceProcess("ingestion", tmp_path / "data") as svc:
        stub = ingestion_pb2_grpc.DatasetServiceStub(svc.channel())
        for bad in (2.0, -1.0, float("nan")):
            with pytest.raises(grpc.RpcError) as e:
                stub.GenerateSynthetic(ingestion_pb2.GenerateSyntheticRequest(
                    out_dir="synthetic/bad", songs=1, seconds=4, produce=bad), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "production strength" in e.value.details()
        assert not (tmp_path / "data" / "synthetic" / "bad").exists()
        env = {"STEMLAB_INGESTION_ADDRESS": svc.address}
        r = run_cli("synth", "synthetic/p", "--songs", "1", "--seconds", "4", "--seed", "2", "--rate", "22050",
                    "--produce", "0.5", "--json", env=env)
        assert r.returncode == 0, r.stderr + r.stdout
        generated = json.loads(r.stdout.strip().splitlines()[-1])["result"]["generated"]
        assert generated["produce"] == 0.5 and generated["songs"][0]["production"]["strength"] == 0.5
        r = run_cli("synth", "synthetic/q", "--songs", "1", "--seconds", "4", "--produce", "3", env=env)
        assert r.returncode == 2 and "production strength must be between 0 and 1" in r.stderr
