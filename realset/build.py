"""Rebuild the real-recordings set (realset/stems/, realset/lists/, realset/PROVENANCE.md).

Every stem is cut from a public recording of a real performance, read straight out of a git
snapshot of its repository (`fetch github:OWNER/NAME` brings one to /work/.mirror/OWNER+NAME/repo;
any clone works with --mirrors pointing at a folder of OWNER+NAME/repo checkouts or bare repos), or
out of a Debian package kept as MIRRORS/debian/PACKAGE_VERSION_all.deb (`apt-get download
PACKAGE=VERSION` there). Nothing is rendered from MIDI.

Each track is a folder of mono 22050 Hz 16-bit FLAC stems whose file names map to the project's
classes (services/ingestion/mapping.yaml), so `stemlab dataset import stems realset/stems` reads it.
The stems are written after scaling and quantising, so the mixture the product builds (the sum of
the files) is exactly the sum of the references. "Absent" tracks carry an all-zero guitar (or piano)
stem: the right output there is silence.

The halves are split by recording: a recording (instrument or accompaniment) is used in the
validation half or the test half, never both.

    .venv/bin/python realset/build.py [--mirrors /work/.mirror] [--out realset]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 22050
PIECE_SECONDS = 10.0  # recordings of 20 s or more give several pieces of this length
MAX_SECONDS = 12.0  # a shorter recording gives one piece of at most this length
LEVELS_DB = (-6, 0, 6)  # instrument RMS over rest RMS
PEAK = 0.89  # the mixture's peak after scaling (about -1 dBFS), so nothing clips at 16 bits
FADE_SECONDS = 0.01  # fades where a short accompaniment is repeated, so joins do not click

CC0 = "CC0 1.0 (etc/samples/README.md)"
SMS = "CC BY 4.0 (sounds/LICENSE: freesound.org, pack xserra/13038 and others)"
MIT = "MIT (the repository's LICENSE; no separate licence for the audio)"
APACHE = "Apache-2.0 (the repository's LICENSE; no separate licence for the audio)"


@dataclass(frozen=True)
class Recording:
    key: str  # short name used in track ids
    repo: str  # OWNER/NAME
    commit: str
    path: str
    licence: str
    what: str
    file: str  # stem file name in a track folder: its words map to the class
    half: str  # "val" or "test"
    loop: bool = False  # a loop: repeated seamlessly to the piece length
    max_pieces: int = 0  # at most this many pieces of a long recording (0: all), so the set stays small
    rate: int = 0  # the true sample rate where the file's header is wrong (0: the header's)

    @property
    def mirror(self) -> str:
        return self.repo.replace("/", "+")

    @property
    def debian(self) -> str | None:
        """The Debian package the recording is read from (repo `debian:PACKAGE`, commit its version)."""
        return self.repo.removeprefix("debian:") if self.repo.startswith("debian:") else None


SONIC = ("sonic-pi-net/sonic-pi", "c0002065a976b1355e7889f4aa96a1804e2b8119")
MIRW = ("mrocamora/mir_workshop", "5d14695d339a3c87041e18213afee19ca2084459")
SUSHI = ("elk-audio/sushi", "add70cf0228440cc561f7f37efb2409de68666c0")
SMST = ("MTG/sms-tools", "7d1d2c704336e0fec7ddcec75996dfbe53e35226")  # the last commit with sounds/
LIBTSM = ("meinardmueller/libtsm", "91b6be031e91fa3ef5552cad8a1863e2e56acb95")
SYNC = ("meinardmueller/synctoolbox", "583b47de2b8e152b3240731c5ff9886b98c8f053")
PIANOTR = ("bytedance/piano_transcription", "1ade7dcd4348add669a67c6e6282456c8c6633bd")
BPITCH = ("spotify/basic-pitch", "fa5997af0a8210982619003269994a1be25eddf3")
VOCADITO = "CC BY 4.0 (vocadito; basic-pitch is Apache-2.0)"
# Added in the set's second version (appended to their lists, so every track of the first version is
# built byte for byte as before).
GSDEMO = ("AutomateGuitarTranscription/Demo-Page", "61a32481b424719a0e748ef00172c5284c29c8ac")
GUITARSET = ("CC BY 4.0 (GuitarSet, Xi et al., ISMIR 2018; the files are GuitarSet's microphone takes, "
             "unmodified; the repository states no licence of its own)")
AUDIOMENT = ("iver56/audiomentations", "73b94488279feda6542a2813c70ed0d00b49ee4f")
GOLDBERG = ("chmaha/sample-right", "ad87d651f008eb390c5597df702529bea6488156")
WTC = ("DashieDev/DoggyTalentsNext", "ba3e7df769f4cbd1d5b6b54cff6c63f0042dccdd")
# Added in the third version (appended likewise).
OBLIVION = ("Vale717171/archive-of-oblivion", "1d2afafb82aab5972b99b7a6117fe93bd674fc87")  # older commits: renders
VOICEOVER = ("ChrisJan00/voiceover", "75867205c051bb507abec781e793ed7911f4f282")
MUSICMIND = ("GitZilla8462/music-mind-academy-git", "8b66efad2372c8e8b1853ffe31106e963fe291bb")
TONEJS = ("Tonejs/audio", "efd8296360f9526e379bfbe5c1698ff54d6a1d34")
AUDIOFLUX = ("libAudioFlux/audioFlux", "0c3f55b409b07381bfe770711e3642e19f333bee")
ISHIZAKA_OWTC = ("CC0 1.0 (The Open Well-Tempered Clavier, Kimiko Ishizaka; assets/audio/ATTRIBUTION.md, with the "
                 "Wikimedia Commons page of each file; the repository has no licence of its own)")
BERKLEE = ("CC BY 3.0 (OLPC Berklee Sound Library; berklee/README.md; the repository's loop/ folder, "
           "CC BY-NC-SA, is not used)")


# Version 4: real band songs as the band mixed them. A rhythm game's songs come as the guitar part
# and the rest of the band in two files (Frets on Fire: guitar.ogg, song.ogg), so the song is the
# exact sum of an instrument reference and a rest reference.
MULDJORD = ("debian:fretsonfire-songs-muldjord", "2.dfsg-2.1")
MULDJORD_LICENCE = ("CC BY-SA 3.0 (the package's usr/share/doc/fretsonfire-songs-muldjord/copyright: composed and "
                    "performed by El Senator of the Danish metal band Muldjord; the stems here, cut from it, are "
                    "CC BY-SA 3.0 too)")


def owtc(key, path, piece) -> Recording:
    """One of Ishizaka's Well-Tempered Clavier recordings (the album of fugue849: test half only)."""
    return rec(key, OBLIVION, f"assets/audio/{path}", ISHIZAKA_OWTC, f"Bach, {piece} (Ishizaka), its first 10 s",
               "piano.flac", "test", max_pieces=1)


def guitarset(key, take, half) -> Recording:
    """One GuitarSet microphone take (a player's solo or comping performance, acoustic guitar)."""
    return rec(key, GSDEMO, f"transcription_samples/GuitarSet/{take}_mic/{take}_mic.wav", GUITARSET,
               f"acoustic guitar, GuitarSet take {take}", "acoustic-guitar.flac", half, max_pieces=1)


def rec(key, source, path, licence, what, file, half, loop=False, max_pieces=0, rate=0) -> Recording:
    return Recording(key, source[0], source[1], path, licence, what, file, half, loop, max_pieces, rate)


GUITARS = [
    rec("elecguit", SUSHI, "misc/soundfiles/elecguit.wav", "CC BY 4.0 (misc/README.md: freesound.org/s/652043 by Jibey-)",
        "electric guitar phrase, amplified", "electric-guitar.flac", "val"),
    rec("efifths", SONIC, "etc/samples/guit_e_fifths.flac", CC0, "guitar fifths on E (freesound 46990, Sub-d)",
        "guitar.flac", "val"),
    rec("eslide", SONIC, "etc/samples/guit_e_slide.flac", CC0, "guitar slide on E (freesound 2410, Suva)",
        "guitar.flac", "val"),
    rec("mirguitar", MIRW, "audio/guitar.wav", MIT, "guitar melody (an 8 kHz recording)", "guitar.flac",
        "val"),
    rec("dedos", MIRW, "audio/dedos_guitar.wav", MIT, "guitar part of a recorded song (Dedos)",
        "guitar.flac", "test"),
    rec("em9", SONIC, "etc/samples/guit_em9.flac", CC0, "guitar Em9 chord (freesound 46992, Sub-d)",
        "guitar.flac", "test"),
    rec("harmonics", SONIC, "etc/samples/guit_harmonics.flac", CC0, "guitar harmonics (freesound 141524, BStateham)",
        "guitar.flac", "test"),
    # Version 2: GuitarSet players 03 and 04 in validation, player 05 in test.
    guitarset("gs03jazz2c", "03_Jazz2-110-Bb_comp", "val"),
    guitarset("gs03ss1c", "03_SS1-68-E_comp", "val"),
    guitarset("gs03ss2s", "03_SS2-107-Ab_solo", "val"),
    guitarset("gs04bn2c", "04_BN2-166-Ab_comp", "val"),
    rec("augguitar", AUDIOMENT, "demo/acoustic_guitar_0.wav", "MIT (the repository's LICENSE; no separate licence "
        "for the audio)", "acoustic guitar excerpt (a 16 kHz recording)", "acoustic-guitar.flac", "val"),
    guitarset("gs05jazz3c", "05_Jazz3-137-Eb_comp", "test"),
    guitarset("gs05jazz3s", "05_Jazz3-137-Eb_solo", "test"),
    guitarset("gs05rock1c", "05_Rock1-130-A_comp", "test"),
    guitarset("gs05rock1s", "05_Rock1-130-A_solo", "test"),
    # Version 3.
    rec("afchord", AUDIOFLUX, "python/audioflux/utils/sample_data/guitar_chord2.wav", "MIT (the repository's "
        "LICENSE.md; no separate licence for the audio, nor who played it)", "guitar chord sequence (a 32 kHz "
        "recording; the kind of guitar is not stated)", "guitar.flac", "val", max_pieces=1),
    rec("berklee5", TONEJS, "berklee/guitar_riff_cutup5.mp3", BERKLEE, "guitar riff, cut up (the kind of guitar "
        "is not stated)", "guitar.flac", "test", max_pieces=1),
    rec("berklee4", TONEJS, "berklee/guitar_riff_cutup4.mp3", BERKLEE, "another guitar riff, cut up (the same "
        "library)", "guitar.flac", "test"),
]
PIANOS = [
    rec("chopin", SYNC, "data_music/Chopin_Op010-03-Measures1-8_Varsi.wav", MIT,
        "Chopin op. 10 no. 3, bars 1-8, a performance (Varsi)", "piano.flac", "val"),
    rec("smspiano", SMST, "sounds/piano.wav", SMS, "piano phrase (freesound, xserra)", "piano.flac", "val"),
    rec("ambipiano", SONIC, "etc/samples/ambi_piano.flac", CC0, "piano chords (freesound 51245, RutgerMuller)",
        "piano.flac", "val"),
    rec("beethoven", LIBTSM, "data/BeethovenPiano.wav", MIT, "Beethoven, a piano recording", "piano.flac", "test"),
    rec("bach", PIANOTR, "resources/cut_bach.mp3", APACHE, "Bach, a piano recording", "piano.flac", "test"),
    # Version 2: two of Kimiko Ishizaka's recordings, a different piece in each half.
    rec("goldberg", GOLDBERG, "goldberg-test.wav", "CC0 1.0 (The Open Goldberg Variations, Kimiko Ishizaka; the "
        "repository's README; its GPL-3.0 covers its code)", "Bach, Goldberg Variations excerpt (Ishizaka); the "
        "file's header says 48 kHz, the audio is 44.1 kHz (README)", "piano.flac", "val", rate=44100),
    rec("fugue849", WTC, "src/main/resources/assets/doggytalents/sounds/music/"
        "kimiko_ishizaka_fugue_no_4_in_c_sharp_minor_bwv_849.ogg", "CC0 1.0 (The Open Well-Tempered Clavier, Kimiko "
        "Ishizaka; src/main/java/doggytalents/DoggySounds.java; the repository's LGPL-3.0 covers its code)",
        "Bach, Fugue in C-sharp minor BWV 849 (Ishizaka), its first 30 s", "piano.flac", "test", max_pieces=3),
    # Version 3: a third pianist in validation and more of Ishizaka's two albums, each album in one
    # half (the Goldberg Variations in validation, the Well-Tempered Clavier in test).
    rec("moonlight", MUSICMIND, "frontend/public/audio/classical/beethoven-moonlight-sonata-adagio.mp3",
        "public domain (Musopen; frontend/public/audio/classical/ATTRIBUTION.md, which credits Paul Pitman; the "
        "repository has no licence of its own)", "Beethoven, Moonlight Sonata, I. Adagio sostenuto, an excerpt "
        "(Paul Pitman)", "piano.flac", "val"),
    rec("aria", OBLIVION, "assets/audio/bach_aria_goldberg.ogg", "CC0 1.0 (The Open Goldberg Variations, Kimiko "
        "Ishizaka; assets/audio/ATTRIBUTION.md, with the Wikimedia Commons page; the repository has no licence of "
        "its own)", "Bach, Goldberg Variations, Aria da capo (Ishizaka), its first 10 s", "piano.flac", "val",
        max_pieces=1),
    rec("ogvgame", VOICEOVER, "qml/voiceover/goldberg.ogg", "CC0 1.0 (The Open Goldberg Variations, Kimiko "
        "Ishizaka; the game's credits in qml/voiceover/*.qml; the repository has no licence of its own)",
        "Bach, a Goldberg Variations excerpt (Ishizaka), its first 10 s", "piano.flac", "val", max_pieces=1),
    owtc("prelude846", "bach_bwv846_soglia.ogg", "Prelude in C major BWV 846"),
    owtc("prelude855", "lab_bain_marie_variation.ogg", "Prelude in E minor BWV 855"),
]
# Accompaniment, by half. Drums are loops or rhythm recordings; the second part is a voice or an
# instrument that is neither guitar nor piano.
DRUMS = [
    rec("arovanea", SONIC, "etc/samples/arovane_beat_a.flac", "CC0 1.0 (donated by Arovane, etc/samples/README.md)",
        "drum beat", "drums.flac", "val", loop=True),
    rec("amenfull", SONIC, "etc/samples/loop_amen_full.flac", CC0, "amen break drum loop (freesound 202537)",
        "drums.flac", "val", loop=True),
    rec("safari", SONIC, "etc/samples/loop_safari.flac", CC0, "percussion loop (freesound 318759)",
        "percussion.flac", "val", loop=True),
    rec("arovaneb", SONIC, "etc/samples/arovane_beat_b.flac", "CC0 1.0 (donated by Arovane, etc/samples/README.md)",
        "drum beat", "drums.flac", "test", loop=True),
    rec("mika", SONIC, "etc/samples/loop_mika.flac", CC0, "drum loop (freesound 188551)", "drums.flac", "test",
        loop=True),
    rec("drumsolo", LIBTSM, "data/DrumSolo.wav", MIT, "drum kit solo recording", "drums.flac", "test"),
]
PARTS = [
    rec("vocadito10", BPITCH, "tests/resources/vocadito_10.wav", VOCADITO, "solo singing (vocadito 10)",
        "female-singer.flac", "val"),
    rec("singing", SMST, "sounds/singing-female.wav", SMS, "female singing", "female-singer.flac", "val"),
    rec("sax", SMST, "sounds/sax-phrase.wav", SMS, "saxophone phrase", "tenor-saxophone.flac", "val"),
    rec("cello", SMST, "sounds/cello-phrase.wav", SMS, "cello phrase", "cello.flac", "val"),
    rec("melodica", MIRW, "audio/dedos_melodica.wav", MIT, "melodica part of a recorded song (Dedos)",
        "melodica.flac", "val"),
    rec("vocadito14", BPITCH, "tests/resources/vocadito_14.wav", VOCADITO, "solo singing (vocadito 14)",
        "female-singer.flac", "test"),
    rec("tsmvoice", LIBTSM, "data/SingingVoice.wav", MIT, "singing voice recording", "female-singer.flac", "test"),
    rec("orchestra", LIBTSM, "data/BeethovenOrchestra.wav", MIT, "Beethoven orchestra recording",
        "string-section.flac", "test"),
    rec("celloduo", SMST, "sounds/cello-double.wav", SMS, "two cellos", "cello.flac", "test"),
]
SPEECH = [
    rec("speechmale", SMST, "sounds/speech-male.wav", SMS, "male speech", "male-speaker.flac", "val"),
    rec("speechfemale", SMST, "sounds/speech-female.wav", SMS, "female speech", "female-speaker.flac", "test"),
]


def band_song(key, folder, title, half) -> tuple[Recording, Recording]:
    """A Muldjord song: its guitar part (the instrument) and the rest of the band (the accompaniment)."""
    path = f"usr/share/games/fretsonfire/data/songs/muldjord/{folder}"
    return (rec(key, MULDJORD, f"{path}/guitar.ogg", MULDJORD_LICENCE,
                f"distorted electric guitar part of a metal song (Muldjord, {title})", "electric-guitar.flac", half),
            rec(f"{key}band", MULDJORD, f"{path}/song.ogg", MULDJORD_LICENCE,
                f"the rest of the band in that song: drums, bass, voice (Muldjord, {title})", "backing-track.flac",
                half))


BAND_SONGS = [
    band_song("armygeddon", "armygeddon", "Armygeddon", "val"),
    band_song("chaosgod", "chaos_god", "Chaos God", "val"),
    band_song("degeneration", "internal_degeneration", "Internal Degeneration", "test"),
    band_song("mime", "mutilated_mime", "Mutilated Mime", "test"),
]
BAND_PIECES = 3  # a song gives its first pieces in which the guitar plays
BAND_QUIET_DB = 10.0  # a piece whose guitar is this far below the guitar's whole-song RMS is passed over
ALL = GUITARS + PIANOS + DRUMS + PARTS + SPEECH + [r for song in BAND_SONGS for r in song]


def read_recording(mirrors: Path, r: Recording) -> np.ndarray:
    """The recording as mono float64 at RATE, read from the git snapshot (no work tree needed) or
    the Debian package."""
    from services.common.audio import resample

    try:
        blob = read_debian(mirrors, r) if r.debian else subprocess.run(
            ["git", "-C", str(mirrors / r.mirror / "repo"), "show", f"{r.commit}:{r.path}"],
            capture_output=True, check=True).stdout
    except (subprocess.CalledProcessError, KeyError, FileNotFoundError) as e:
        how = (f"`apt-get download {r.debian}={r.commit}` in {mirrors / 'debian'}" if r.debian
               else f"a snapshot of {r.repo} at {mirrors / r.mirror / 'repo'} (fetch github:{r.repo})")
        raise SystemExit(f"build: cannot read {r.path} of {r.repo} at {r.commit}: it needs {how} ({e})") from e
    audio, rate = sf.read(io.BytesIO(blob), always_2d=True, dtype="float64")
    rate = r.rate or rate
    mono = audio.mean(axis=1)
    return resample(mono[None, :], rate, RATE)[0].astype(np.float64)


def read_debian(mirrors: Path, r: Recording) -> bytes:
    """A file of MIRRORS/debian/PACKAGE_VERSION_all.deb, read from its data archive."""
    deb = mirrors / "debian" / f"{r.debian}_{r.commit}_all.deb"
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile(f"./{r.path}")
        if member is None:
            raise FileNotFoundError(f"{deb} has no file {r.path}")
        return member.read()


def band_pieces(guitar: np.ndarray, band: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The song's first BAND_PIECES pieces (of PIECE_SECONDS) in which the guitar plays: (guitar, band)."""
    piece = int(PIECE_SECONDS * RATE)
    whole = rms(guitar)
    out = []
    for start in range(0, min(len(guitar), len(band)) - piece + 1, piece):
        g = guitar[start:start + piece]
        if rms(g) >= whole * 10 ** (-BAND_QUIET_DB / 20):
            out.append((g, band[start:start + piece]))
        if len(out) == BAND_PIECES:
            break
    return out


def pieces(audio: np.ndarray, max_pieces: int = 0) -> list[np.ndarray]:
    """Consecutive PIECE_SECONDS pieces of a long recording (the first `max_pieces` if set), or the
    first MAX_SECONDS of a short one."""
    piece = int(PIECE_SECONDS * RATE)
    count = len(audio) // piece
    if count < 2:
        return [audio[: int(MAX_SECONDS * RATE)]]
    if max_pieces:
        count = min(count, max_pieces)
    return [audio[i * piece:(i + 1) * piece] for i in range(count)]


def fit(audio: np.ndarray, length: int, loop: bool) -> np.ndarray:
    """`audio` repeated (short fades at the joins unless it is a loop) or cut to `length` samples."""
    if len(audio) >= length:
        return audio[:length].copy()
    unit = audio if loop else faded(audio)
    return np.tile(unit, length // len(unit) + 1)[:length]


def faded(audio: np.ndarray) -> np.ndarray:
    """A copy with FADE_SECONDS fades in and out, so repeats of a non-loop recording do not click."""
    unit = audio.copy()
    fade = min(int(FADE_SECONDS * RATE), len(unit) // 2)
    ramp = np.linspace(0.0, 1.0, fade)
    unit[:fade] *= ramp
    unit[len(unit) - fade:] *= ramp[::-1]
    return unit


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def quantise(x: np.ndarray) -> np.ndarray:
    """What a 16-bit FLAC file holds, so the mixture sums exactly the references written."""
    return np.round(np.clip(x, -1.0, 1.0 - 1 / 32768) * 32768) / 32768


@dataclass
class Track:
    name: str
    half: str
    instrument: str  # "guitar" or "piano": the dataset it belongs to
    stems: dict[str, np.ndarray]  # file name -> audio (before the common scaling)
    parts: dict[str, Recording | None]  # file name -> recording (None: the silent absent stem)
    level_db: float | None  # instrument over rest; None for absent tracks


def mixed(name, half, instrument, inst_rec, inst_audio, rest, level_db) -> Track:
    """Instrument over accompaniment at `level_db` (RMS over the piece), rest parts at equal RMS."""
    length = len(inst_audio)
    rest_audio = {}
    for r, audio in rest:
        part = fit(audio, length, r.loop)
        rest_audio[r.file] = part / max(rms(part), 1e-9)
    rest_sum = sum(rest_audio.values())
    gain = 10 ** (level_db / 20) * rms(rest_sum) / max(rms(inst_audio), 1e-9)
    stems = {inst_rec.file: inst_audio * gain, **rest_audio}
    parts = {inst_rec.file: inst_rec, **{r.file: r for r, _ in rest}}
    return Track(name, half, instrument, stems, parts, level_db)


def as_mixed(name, half, instrument, parts: list[tuple[Recording, np.ndarray]]) -> Track:
    """Instrument and rest at the balance they were recorded with (a band's own mix); the level
    recorded is the one measured."""
    (inst_rec, inst_audio), *rest = parts
    rest_sum = sum(audio for _, audio in rest)
    level_db = 20 * np.log10(max(rms(inst_audio), 1e-12) / max(rms(rest_sum), 1e-12))
    return Track(name, half, instrument, {r.file: audio for r, audio in parts}, {r.file: r for r, _ in parts},
                 float(level_db))


def band_tracks(audio: dict[str, np.ndarray]) -> list[Track]:
    """Version 4: each band song's pieces as mixed (guitar tracks), its band alone (no guitar), and
    the whole song (no piano)."""
    tracks = []
    for guitar, band in BAND_SONGS:
        half = guitar.half
        found = band_pieces(audio[guitar.key], audio[band.key])
        for n, (g, b) in enumerate(found, 1):
            tracks.append(as_mixed(f"{half}-guitar-{guitar.key}{n}-mix", half, "guitar", [(guitar, g), (band, b)]))
        g, b = found[0]
        tracks.append(absent(f"{half}-noguitar-song-{guitar.key}", half, "guitar", [(band, b)], natural=True))
        tracks.append(absent(f"{half}-nopiano-song-{guitar.key}", half, "piano", [(guitar, g), (band, b)],
                             natural=True))
    return tracks


def absent(name, half, instrument, rest, natural: bool = False) -> Track:
    """A track without the instrument: its stem is all zeros, the right answer silence. The rest's
    recordings at equal RMS, or (`natural`) at the balance they were recorded with."""
    length = max(min(len(a), int(MAX_SECONDS * RATE)) for _, a in rest)
    stems = {f"{instrument}.flac": np.zeros(length)}
    parts: dict[str, Recording | None] = {f"{instrument}.flac": None}
    for r, audio in rest:
        part = fit(audio, length, r.loop)
        stems[r.file] = part if natural else part / max(rms(part), 1e-9)
        parts[r.file] = r
    return Track(name, half, instrument, stems, parts, None)


def level_name(db: int) -> str:
    return f"minus{-db}db" if db < 0 else f"plus{db}db" if db > 0 else "0db"


def make_tracks(mirrors: Path) -> list[Track]:
    audio = {r.key: read_recording(mirrors, r) for r in ALL}
    tracks: list[Track] = []
    for instrument, recordings in (("guitar", GUITARS), ("piano", PIANOS)):
        for half in ("val", "test"):
            drums = [r for r in DRUMS if r.half == half]
            parts = [r for r in PARTS if r.half == half]
            combo = 0
            for r in (r for r in recordings if r.half == half):
                for n, piece in enumerate(pieces(audio[r.key], r.max_pieces), 1):
                    for db in LEVELS_DB:
                        # Accompaniment rotates over the half's drums and parts, so each piece
                        # meets several combinations and each level several accompaniments.
                        d, p = drums[combo % len(drums)], parts[combo % len(parts)]
                        combo += 1
                        name = f"{half}-{instrument}-{r.key}{n}-{level_name(db)}"
                        tracks.append(mixed(name, half, instrument, r, piece,
                                            [(d, audio[d.key]), (p, audio[p.key])], db))
    for half in ("val", "test"):
        guitars = [r for r in GUITARS if r.half == half]
        pianos = [r for r in PIANOS if r.half == half]
        speech = next(r for r in SPEECH if r.half == half)
        drums = [r for r in DRUMS if r.half == half]
        parts = [r for r in PARTS if r.half == half]
        # No guitar: real solo piano (each piano recording of the half), speech, a band without guitar.
        for r in pianos:
            tracks.append(absent(f"{half}-noguitar-solopiano-{r.key}", half, "guitar",
                                 [(r, pieces(audio[r.key])[0])]))
        tracks.append(absent(f"{half}-noguitar-speech-{speech.key}", half, "guitar", [(speech, audio[speech.key])]))
        for d, p in zip(drums[:2], parts[:2], strict=True):
            tracks.append(absent(f"{half}-noguitar-band-{d.key}-{p.key}", half, "guitar",
                                 [(d, audio[d.key]), (p, audio[p.key])]))
        # No piano: real solo guitar, speech, a band without piano.
        # (version 2 adds the half's first GuitarSet take: comping on an acoustic guitar.)
        for r in guitars[:2] + [g for g in guitars if g.repo == GSDEMO[0]][:1]:
            tracks.append(absent(f"{half}-nopiano-sologuitar-{r.key}", half, "piano",
                                 [(r, pieces(audio[r.key])[0])]))
        tracks.append(absent(f"{half}-nopiano-speech-{speech.key}", half, "piano", [(speech, audio[speech.key])]))
        for d, p in zip(drums[1:3], parts[2:4], strict=True):
            tracks.append(absent(f"{half}-nopiano-band-{d.key}-{p.key}", half, "piano",
                                 [(d, audio[d.key]), (p, audio[p.key])]))
    # Appended after version 3's tracks, so each of those is written exactly as before.
    return tracks + band_tracks(audio)


def write_track(track: Track, folder: Path) -> dict[str, float]:
    """Scale the stems together so the mixture peaks at PEAK, quantise, write FLAC. Returns gains in dB."""
    mixture = sum(track.stems.values())
    scale = PEAK / max(float(np.max(np.abs(mixture))), 1e-9)
    folder.mkdir(parents=True, exist_ok=True)
    gains = {}
    for file, audio in sorted(track.stems.items()):
        out = quantise(audio * scale)
        tmp = folder / f".{file}.tmp"
        sf.write(tmp, out, RATE, format="FLAC", subtype="PCM_16")
        tmp.rename(folder / file)
        gains[file] = 20 * np.log10(rms(out)) if rms(out) > 0 else float("-inf")
    return gains


def provenance(tracks: list[Track], gains: dict[str, dict[str, float]]) -> str:
    used = sorted({r for t in tracks for r in t.parts.values() if r is not None}, key=lambda r: (r.half, r.key))
    lines = [
        "# Real-recordings set: provenance",
        "",
        "Written by `realset/build.py` (do not edit by hand). Every stem is cut from the recording named",
        "below, read from the repository at the commit given (or the Debian package at the version given);",
        "mono, resampled to 22050 Hz (soxr), scaled",
        "and written as 16-bit FLAC. A track's mixture is the sum of its stem files, exactly.",
        "A recording belongs to one half only (validation `val` or `test`).",
        "",
        "## Recordings",
        "",
        "| key | half | repository | path | commit | licence | what |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r.key} | {r.half} | {r.repo} | `{r.path}` | `{r.commit[:12]}` | {r.licence} | {r.what} |"
              for r in used]
    lines += [
        "",
        "## How the tracks are mixed",
        "",
        f"- Instrument tracks: each recording is cut into {PIECE_SECONDS:g}-s pieces (recordings of 20 s or",
        f"  more; the GuitarSet takes give their first, the fugue its first three) or its first {MAX_SECONDS:g} s. Each piece is mixed at instrument-to-rest levels of",
        f"  {', '.join(f'{d:+d}' for d in LEVELS_DB)} dB (RMS over the piece) with a drum/percussion",
        "  recording and a voice or instrument recording of the same half, both at equal RMS; the",
        "  accompaniment rotates over the half's recordings. A shorter accompaniment is repeated (loops",
        f"  seamlessly, others with {FADE_SECONDS * 1000:g}-ms fades at the joins).",
        "- Absent tracks (`noguitar`, `nopiano`): the instrument's stem is all zeros; the rest is real",
        "  solo piano (for guitar), solo guitar (for piano), speech, or drums with a voice/instrument.",
        "- Band songs (version 4, `-mix`): a song's guitar part and the rest of its band, as the band",
        f"  mixed them (the level column is the one measured): the first {BAND_PIECES} pieces of {PIECE_SECONDS:g} s in which",
        f"  the guitar plays (within {BAND_QUIET_DB:g} dB of its whole-song RMS). `noguitar-song`: the band without",
        "  its guitar (the song's first such piece); `nopiano-song`: the whole song, which has no piano.",
        f"- All stems of a track are scaled by one factor so the mixture peaks at {PEAK} (about −1 dBFS).",
        "",
        "## Tracks (stem RMS in dBFS after scaling)",
        "",
        "| track | half | for | level (dB) | stems |",
        "|---|---|---|---:|---|",
    ]
    for t in tracks:
        stems = ", ".join(
            f"{file} ({'silent' if r is None else r.key}, {gains[t.name][file]:.1f})" for file, r in sorted(t.parts.items()))
        level = ("absent" if t.level_db is None else f"{t.level_db:+.2f}, as mixed" if t.name.endswith("-mix")
                 else f"{t.level_db:+g}")
        lines.append(f"| {t.name} | {t.half} | {t.instrument} | {level} | {stems} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirrors", type=Path, default=Path("/work/.mirror"),
                        help="folder of OWNER+NAME/repo git snapshots")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    tracks = make_tracks(args.mirrors)
    gains = {t.name: write_track(t, args.out / "stems" / t.name) for t in tracks}
    lists = args.out / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    for instrument in ("guitar", "piano"):
        for half in ("val", "test"):
            names = [t.name for t in tracks if t.instrument == instrument and t.half == half]
            (lists / f"{instrument}-{half}.txt").write_text("\n".join(names) + "\n")
    (args.out / "PROVENANCE.md").write_text(provenance(tracks, gains))
    print(f"{len(tracks)} tracks in {args.out / 'stems'}")


if __name__ == "__main__":
    main()
