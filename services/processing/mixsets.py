"""Where mixed instrument/rest pairs live under the data root (one place for the layout).

    mixes/<instrument>[+<also>...]/<rate>[-stereo]/<track>/{instrument,rest}.wav, stats.yaml
    mixes/<instrument>[+<also>...]/<rate>[-stereo]-silence-<target>-<cutoff>/<track>/
        {instrument,rest}.wav, silence.yaml      (a silence-adjusted set derived from the first)

`<instrument>` is the class asked for; classes added with --also join it with "+" in sorted
order (e.g. "guitar+piano"), so a different grouping never overwrites another. Mono sets keep
the plain `<rate>` folder of docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.library import CLASSES
from services.common.paths import DataRoot, safe_join

# Classes that are never part of instrument or rest (the thesis' rule).
NEVER_MIXED = ("mix", "excluded")
INSTRUMENT_FILE = "instrument.wav"
REST_FILE = "rest.wav"
STATS_FILE = "stats.yaml"
SILENCE_FILE = "silence.yaml"
MAX_RATE_HZ = 192_000
MIN_RATE_HZ = 4_000


def validate_instrument(instrument: str, also: tuple[str, ...] | list[str] = ()) -> tuple[str, tuple[str, ...]]:
    """The instrument class and the sorted, de-duplicated extra classes; raises on bad names."""
    mixable = [c for c in CLASSES if c not in NEVER_MIXED]
    if instrument not in mixable:
        raise InvalidArgumentError(f"instrument must be one of {', '.join(mixable)}, got {instrument!r}")
    extra = []
    for cls in also:
        if cls not in mixable:
            raise InvalidArgumentError(f"--also class must be one of {', '.join(mixable)}, got {cls!r}")
        if cls != instrument and cls not in extra:
            extra.append(cls)
    return instrument, tuple(sorted(extra))


def validate_rate(rate_hz: int) -> int:
    if not isinstance(rate_hz, int) or not MIN_RATE_HZ <= rate_hz <= MAX_RATE_HZ:
        raise InvalidArgumentError(f"rate must be a whole number of Hz in {MIN_RATE_HZ}..{MAX_RATE_HZ}, got {rate_hz!r}")
    return rate_hz


def fmt_ratio(x: float) -> str:
    """0.7 -> "0.7", 0.50 -> "0.5" (folder names of silence-adjusted sets)."""
    return f"{float(x):g}"


@dataclass(frozen=True)
class MixSet:
    """One folder of instrument/rest pairs: an instrument grouping at one rate and channel layout."""

    instrument: str
    rate_hz: int
    stereo: bool = False
    also: tuple[str, ...] = ()
    silence: tuple[float, float] | None = None  # (target, cutoff) of a silence-adjusted set

    def __post_init__(self) -> None:
        instrument, also = validate_instrument(self.instrument, self.also)
        object.__setattr__(self, "also", also)
        validate_rate(self.rate_hz)
        if self.silence is not None:
            target, cutoff = (float(v) for v in self.silence)
            if not (0 < target <= 1 and 0 <= cutoff <= target):
                raise InvalidArgumentError(f"silence target:cutoff must satisfy 0 <= cutoff <= target <= 1, got {target}:{cutoff}")
            object.__setattr__(self, "silence", (target, cutoff))

    @property
    def group_name(self) -> str:
        return "+".join((self.instrument, *self.also))

    @property
    def folder_name(self) -> str:
        name = f"{self.rate_hz}{'-stereo' if self.stereo else ''}"
        if self.silence is not None:
            name += f"-silence-{fmt_ratio(self.silence[0])}-{fmt_ratio(self.silence[1])}"
        return name

    @property
    def channels(self) -> int:
        return 2 if self.stereo else 1

    def classes(self) -> frozenset[str]:
        """The classes mixed into the instrument file."""
        return frozenset((self.instrument, *self.also))

    def base(self) -> MixSet:
        """The plain mix set a silence-adjusted one is derived from."""
        return MixSet(self.instrument, self.rate_hz, self.stereo, self.also, None)

    def adjusted(self, target: float, cutoff: float) -> MixSet:
        return MixSet(self.instrument, self.rate_hz, self.stereo, self.also, (target, cutoff))

    def root(self, data: DataRoot) -> Path:
        return safe_join(data.mixes, self.group_name, self.folder_name)

    def track_dir(self, data: DataRoot, track_id: str) -> Path:
        return safe_join(self.root(data), track_id)

    def to_dict(self) -> dict:
        return {"instrument": self.instrument, "also": list(self.also), "rate_hz": self.rate_hz,
                "stereo": self.stereo,
                "silence": None if self.silence is None else {"target": self.silence[0], "cutoff": self.silence[1]}}

    def track_ids(self, data: DataRoot) -> list[str]:
        """Tracks with a finished pair in this set (report file present), sorted."""
        root = self.root(data)
        if not root.is_dir():
            return []
        report = SILENCE_FILE if self.silence is not None else STATS_FILE
        return sorted(p.name for p in root.iterdir()
                      if not p.name.startswith(".") and (p / report).is_file())

    def require(self, data: DataRoot) -> Path:
        root = self.root(data)
        if not root.is_dir():
            hint = ("run `stemlab silence adjust` first" if self.silence is not None
                    else "run `stemlab mix` first")
            raise NotFoundError(f"no mixes for {self.group_name} at {self.folder_name} ({root}); {hint}")
        return root


# libyaml when present: report files are read and written once per track and rate.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump_yaml(data: dict) -> str:
    return yaml.dump(data, Dumper=_DUMPER, sort_keys=False, allow_unicode=True)


def read_yaml(path: Path) -> dict:
    """A report file of a pair folder; {} when it is missing or unreadable (then it is redone)."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)  # CSafeLoader/SafeLoader: safe
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}
