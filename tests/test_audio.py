"""Audio I/O: every format the project meets reads back as (channels, samples) float32, bad files
give an AudioError naming the file, and writes never leave half files behind."""

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from services.common import audio as audio_io
from services.common.audio import (
    AudioError,
    audio_info,
    read_audio,
    resample,
    resampled_length,
    to_mono,
    to_stereo,
    write_audio,
)

RATE = 44100
pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")


def sine(freq_hz=1000.0, seconds=0.5, rate=RATE, channels=2, amplitude=0.5):
    t = np.arange(int(seconds * rate)) / rate
    left = amplitude * np.sin(2 * np.pi * freq_hz * t)
    rows = (
        [left, 0.5 * left][:channels]
        if channels <= 2
        else [left * (k + 1) / channels for k in range(channels)]
    )
    return np.asarray(rows, np.float32)


def dominant_hz(signal, rate):
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return np.argmax(spectrum) * rate / len(signal)


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


@pytest.fixture
def source_wav(tmp_path):
    path = tmp_path / "source.wav"
    sf.write(path, sine().T, RATE, subtype="PCM_24")
    return path


@pytest.mark.parametrize(
    "suffix, codec_args, lossless",
    [
        (".wav", ["-c:a", "pcm_s16le"], True),
        (".flac", ["-c:a", "flac"], True),
        (".aiff", ["-c:a", "pcm_s16be"], True),
        (".ogg", ["-c:a", "libvorbis", "-q:a", "6"], False),
        (".mp3", ["-c:a", "libmp3lame", "-b:a", "192k"], False),
        (".m4a", ["-c:a", "aac", "-b:a", "192k"], False),
    ],
)
def test_files_made_by_ffmpeg_read_back_as_channels_first_float32(
    tmp_path, source_wav, suffix, codec_args, lossless
):
    encoded = tmp_path / f"song{suffix}"
    ffmpeg("-i", str(source_wav), *codec_args, str(encoded))
    original = sine()

    audio, rate = read_audio(encoded)

    assert rate == RATE and audio.dtype == np.float32 and audio.shape[0] == 2
    if lossless:
        assert audio.shape == original.shape
        np.testing.assert_allclose(audio, original, atol=1.0 / 2**15)
    else:
        # Lossy codecs may pad a frame or so; the content must still be the same tone, in both channels.
        assert abs(audio.shape[1] - original.shape[1]) < 0.05 * RATE
        assert abs(dominant_hz(audio[0], rate) - 1000) < 5
        assert np.sqrt(np.mean(audio[1] ** 2)) == pytest.approx(np.sqrt(np.mean(original[1] ** 2)), rel=0.1)
    info_rate, info_channels, info_frames = audio_info(encoded)
    assert (info_rate, info_channels) == (RATE, 2)
    assert abs(info_frames - original.shape[1]) < 0.05 * RATE


@pytest.mark.parametrize(
    "name, subtype, atol",
    [
        ("a.wav", None, 0.0),
        ("a.wav", "PCM_16", 1.0 / 2**15),
        ("a.wav", "PCM_24", 1.0 / 2**23),
        ("a.flac", None, 1.0 / 2**23),
        ("a.flac", "PCM_16", 1.0 / 2**15),
    ],
)
def test_lossless_write_read_round_trip(tmp_path, name, subtype, atol):
    original = sine(channels=2)
    write_audio(tmp_path / name, original, RATE, subtype=subtype)
    audio, rate = read_audio(tmp_path / name)
    assert rate == RATE
    np.testing.assert_allclose(audio, original, atol=atol)


def test_float_wav_is_the_default_and_keeps_values_above_full_scale(tmp_path):
    loud = sine(amplitude=1.5)
    write_audio(tmp_path / "loud.wav", loud, RATE)
    assert sf.info(tmp_path / "loud.wav").subtype == "FLOAT"
    np.testing.assert_array_equal(read_audio(tmp_path / "loud.wav")[0], loud)


def test_pcm_writes_clip_instead_of_wrapping_around(tmp_path):
    loud = sine(amplitude=1.5)
    write_audio(tmp_path / "loud.flac", loud, RATE)
    audio, _ = read_audio(tmp_path / "loud.flac")
    assert audio.max() > 0.99 and audio.min() < -0.99
    # Wrapped samples would flip sign where the input is largest.
    peak = np.argmax(loud[0])
    assert audio[0, peak] > 0.99


@pytest.mark.parametrize("use_soundfile", [True, False])
def test_mp3_write_round_trip(tmp_path, monkeypatch, use_soundfile):
    if not use_soundfile:
        monkeypatch.setattr(audio_io, "_soundfile_writes_mp3", lambda: False)
    elif not audio_io._soundfile_writes_mp3():
        pytest.skip("libsndfile without MP3")
    original = sine(channels=2)
    write_audio(tmp_path / "a.mp3", original, RATE)
    audio, rate = read_audio(tmp_path / "a.mp3")
    assert rate == RATE and audio.shape[0] == 2
    assert abs(audio.shape[1] - original.shape[1]) < 0.05 * RATE
    assert abs(dominant_hz(audio[0], rate) - 1000) < 5
    # 320 kbit/s: about 20 kB per half second of stereo.
    assert (tmp_path / "a.mp3").stat().st_size > 15_000


def test_mono_and_resampling_on_read(tmp_path):
    write_audio(tmp_path / "a.wav", sine(channels=2), RATE)
    audio, rate = read_audio(tmp_path / "a.wav", rate=22050, mono=True)
    assert rate == 22050
    assert audio.shape == (1, resampled_length(int(0.5 * RATE), RATE, 22050))
    assert abs(dominant_hz(audio[0], rate) - 1000) < 3
    # mean of the channels (the right one is half as loud)
    assert np.abs(audio).max() == pytest.approx(0.375, rel=0.02)


@pytest.mark.parametrize("to_hz", [22050, 16000, 48000, 8000])
def test_resample_keeps_the_frequency_and_gets_the_length_right(to_hz):
    tone = sine(seconds=1.0001, channels=2)
    out = resample(tone, RATE, to_hz)
    assert out.dtype == np.float32
    assert out.shape == (2, round(tone.shape[1] * to_hz / RATE))
    assert abs(dominant_hz(out[0], to_hz) - 1000) < 2
    # Band-limited: amplitude preserved in the steady state.
    middle = out[0, out.shape[1] // 4 : 3 * out.shape[1] // 4]
    assert np.abs(middle).max() == pytest.approx(0.5, rel=0.01)


def test_resample_removes_content_above_the_new_nyquist():
    high = sine(freq_hz=15000, seconds=0.5)
    out = resample(high, RATE, 16000)  # new Nyquist 8 kHz: 15 kHz must not alias to 1 kHz
    assert np.sqrt(np.mean(out[:, 400:-400] ** 2)) < 1e-3


def test_resample_same_rate_is_a_no_op():
    tone = sine()
    np.testing.assert_array_equal(resample(tone, RATE, RATE), tone)


def test_to_mono_and_to_stereo_shapes():
    stereo = sine(channels=2)
    assert to_mono(stereo).shape == (1, stereo.shape[1])
    np.testing.assert_allclose(to_mono(stereo)[0], stereo.mean(axis=0), atol=1e-7)
    mono = sine(channels=1)
    np.testing.assert_array_equal(to_stereo(mono), np.vstack([mono, mono]))
    np.testing.assert_array_equal(to_stereo(stereo), stereo)
    surround = np.ones((6, 100), np.float32)  # 5.1 at full scale stays within full scale
    down = to_stereo(surround)
    assert down.shape == (2, 100)
    np.testing.assert_allclose(down, 1.0, atol=1e-6)
    lfe_only = np.zeros((6, 100), np.float32)
    lfe_only[3] = 1.0
    assert np.abs(to_stereo(lfe_only)).max() == 0.0
    assert to_stereo(np.ones((7, 10), np.float32)).shape == (2, 10)


def write_bytes(path, data):
    path.write_bytes(data)
    return path


def bad_files(tmp_path):
    yield "missing", tmp_path / "missing.wav"
    yield "empty", write_bytes(tmp_path / "empty.wav", b"")
    yield "text", write_bytes(tmp_path / "notes.wav", b"this is not audio\n" * 50)
    yield "text mp3", write_bytes(tmp_path / "notes.mp3", b"this is not audio either\n" * 50)
    playlist = (
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/segment.ts\n#EXT-X-ENDLIST\n"
    )
    yield "playlist pointing at a URL", write_bytes(tmp_path / "playlist.mp3", playlist)
    png = tmp_path / "picture.png"
    ffmpeg("-f", "lavfi", "-i", "color=c=red:s=16x16", "-frames:v", "1", str(png))
    yield "png", write_bytes(tmp_path / "picture.wav", png.read_bytes())
    yield "png m4a", write_bytes(tmp_path / "picture.m4a", png.read_bytes())
    zero = tmp_path / "zero_frames.wav"
    with sf.SoundFile(zero, "w", samplerate=RATE, channels=2, subtype="PCM_16"):
        pass
    yield "zero frames", zero
    many = tmp_path / "many_channels.wav"
    sf.write(many, np.zeros((100, 64), np.float32), RATE)
    yield "64 channels", many
    fast = tmp_path / "absurd_rate.wav"
    sf.write(fast, np.zeros((100, 1), np.float32), 1_000_000)
    yield "rate above 768 kHz", fast
    good = tmp_path / "rate0.wav"
    sf.write(good, np.zeros((100, 1), np.float32), RATE, subtype="PCM_16")
    data = bytearray(good.read_bytes())
    data[24:28] = (0).to_bytes(4, "little")  # WAV fmt chunk sample rate field
    yield "rate 0", write_bytes(tmp_path / "rate0_broken.wav", bytes(data))
    truncated = tmp_path / "truncated.flac"
    write_audio(tmp_path / "whole.flac", sine(), RATE)
    yield "truncated header", write_bytes(truncated, (tmp_path / "whole.flac").read_bytes()[:30])
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    yield "folder", folder


def test_every_bad_file_raises_audio_error_naming_the_file(tmp_path):
    for label, path in bad_files(tmp_path):
        with pytest.raises(AudioError) as caught:
            read_audio(path)
        assert path.name in str(caught.value), label
        assert caught.value.reason, label
        with pytest.raises(AudioError) as caught_info:
            audio_info(path)
        assert path.name in str(caught_info.value), label


def test_bad_writes_raise_audio_error_and_leave_nothing(tmp_path):
    tone = sine()
    with_nan = tone.copy()
    with_nan[0, 10] = np.nan
    cases = [
        ("nan.wav", with_nan, RATE, None),
        ("transposed.wav", tone.T, RATE, None),
        ("empty.wav", np.zeros((2, 0), np.float32), RATE, None),
        ("float.flac", tone, RATE, "FLOAT"),
        ("a.ogg", tone, RATE, None),
        ("odd_rate.mp3", tone, 44000, None),
        ("zero_rate.wav", tone, 0, None),
    ]
    for name, audio, rate, subtype in cases:
        with pytest.raises(AudioError) as caught:
            write_audio(tmp_path / name, audio, rate, subtype=subtype)
        assert name in str(caught.value)
    with pytest.raises(AudioError, match="does not exist"):
        write_audio(tmp_path / "no_such_folder" / "a.wav", tone, RATE)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_atomic_write_leaves_no_temp_file_and_never_a_half_file(tmp_path, monkeypatch):
    target = tmp_path / "mix.wav"
    write_audio(target, sine(amplitude=0.25), RATE)
    before = target.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["mix.wav"]

    real_write = audio_io._write_soundfile

    def crash_half_way(path, frames, *args):
        real_write(path, frames[: len(frames) // 2], *args)
        raise RuntimeError("disk full")

    monkeypatch.setattr(audio_io, "_write_soundfile", crash_half_way)
    with pytest.raises(AudioError, match="mix.wav"):
        write_audio(target, sine(amplitude=0.9), RATE)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["mix.wav"]

    monkeypatch.setattr(audio_io, "_write_soundfile", real_write)
    write_audio(target, sine(amplitude=0.9), RATE)
    np.testing.assert_array_equal(read_audio(target)[0], sine(amplitude=0.9))
    assert [p.name for p in tmp_path.iterdir()] == ["mix.wav"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)


def test_identical_audio_gives_identical_bytes(tmp_path):
    # libsndfile stamps float WAVs with the time in a PEAK chunk unless told not to.
    for name in ("a.wav", "a.flac"):
        write_audio(tmp_path / name, sine(), RATE)
        first = (tmp_path / name).read_bytes()
        write_audio(tmp_path / name, sine(), RATE)
        assert (tmp_path / name).read_bytes() == first
    assert b"PEAK" not in (tmp_path / "a.wav").read_bytes()
