"""Instrument name -> class mapping: the shipped defaults, the user's additions, and lookups.

Names from metadata (MedleyDB instruments, Slakh program names) are looked up exactly, after
normalising case, spacing and Slakh's "(continued)" suffix. File names of stem folders without
metadata are split into whole words and the longest mapped run of words wins, so
"Bass Guitar.wav" is bass (not guitar) and "07_ElecGtr1.wav" is guitar. A name that maps to
nothing stays unmapped (class None); nothing is guessed silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.common.errors import InvalidArgumentError
from services.common.library import CLASSES
from services.common.paths import DataRoot, atomic_write_text

DEFAULT_MAPPING_PATH = Path(__file__).with_name("mapping.yaml")
# The user's additions and overrides, relative to the data root.
USER_MAPPING_PARTS = ("ingestion", "mapping.yaml")
# Multiple instruments of one stem are stored in Stem.raw_instrument joined by this.
INSTRUMENT_SEPARATOR = "; "
# Runs of more words than this are not looked up (no mapped name is longer).
_MAX_WORDS = 4


class MappingError(InvalidArgumentError):
    """A mapping file or entry is invalid."""


def normalize_name(name: str) -> str:
    """Lower-case, single spaces, without Slakh's "(continued)" suffix."""
    text = re.sub(r"\s+", " ", str(name)).strip().lower()
    text = re.sub(r"\s*\(continued\)$", "", text)
    return text


def split_instruments(raw_instrument: str) -> list[str]:
    return [p for p in (s.strip() for s in raw_instrument.split(INSTRUMENT_SEPARATOR.strip())) if p]


def filename_words(file_name: str) -> list[str]:
    """Whole words of a stem file name, lower-cased, digits dropped.

    "07_ElecGtr1.wav" -> ["elec", "gtr"]; "EGtr_DI.wav" -> ["e", "gtr", "di"];
    "Bass Guitar.wav" -> ["bass", "guitar"]; "drums_1.ogg" -> ["drums"].
    """
    stem = Path(file_name).stem
    # camelCase and ABBRev boundaries: "ElecGtr" -> "Elec Gtr", "EGtr" -> "E Gtr".
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)
    spaced = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", " ", spaced)
    return [w.lower() for w in re.split(r"[^A-Za-z]+", spaced) if w]


def _validate_entries(entries: dict, where: str) -> dict[str, str]:
    if not isinstance(entries, dict):
        raise MappingError(f"{where}: the mapping must be a mapping of name -> class")
    out: dict[str, str] = {}
    for name, klass in entries.items():
        key = normalize_name(name)
        if not key:
            raise MappingError(f"{where}: empty instrument name")
        if klass not in CLASSES:
            raise MappingError(f"{where}: {name!r} maps to unknown class {klass!r}; classes are "
                               f"{', '.join(CLASSES)}")
        out[key] = klass
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise MappingError(f"cannot read mapping {path}: {e}") from e
    return data or {}


@dataclass
class Match:
    """Result of classifying a stem: its class (None while unmapped) and why."""
    cls: str | None
    suggested: bool = False
    words: list[str] = field(default_factory=list)   # the names/words that decided it
    reason: str = ""                                 # why it is unmapped, when it is


class Mapping:
    """name -> class lookups over the defaults merged with the user's entries."""

    def __init__(self, entries: dict[str, str]):
        self.entries = dict(entries)

    @classmethod
    def defaults(cls) -> Mapping:
        return cls(_validate_entries(_read_yaml(DEFAULT_MAPPING_PATH), str(DEFAULT_MAPPING_PATH)))

    @classmethod
    def load(cls, data: DataRoot | None = None) -> Mapping:
        """The defaults, overridden by DATA/ingestion/mapping.yaml if it exists."""
        mapping = cls.defaults()
        if data is not None:
            mapping.entries.update(user_entries(data))
        return mapping

    def lookup(self, name: str) -> str | None:
        return self.entries.get(normalize_name(name))

    def instrument_named(self, name: str) -> str | None:
        """The class a whole name stands for ("Guitars", "Bass Guitar", "Drums"), or None when
        the name is more than an instrument's ("Guitar Song")."""
        words = filename_words(name + ".wav")
        for form in (words, [_singular(w) for w in words]):
            for key in (" ".join(form), "".join(form), "-".join(form)):
                if key in self.entries:
                    return self.entries[key]
        return None

    def classify_instruments(self, names: list[str]) -> Match:
        """Class of a stem from its metadata instrument name(s): exact lookups only.

        Several instruments on one stem get their common class; if they disagree (e.g. a stem
        of "electric bass" and "acoustic guitar") the stem stays unmapped so a person decides.
        """
        names = [n for n in names if normalize_name(n)]
        if not names:
            return Match(None, reason="no instrument name")
        classes = {n: self.lookup(n) for n in names}
        unknown = [n for n, c in classes.items() if c is None]
        if unknown:
            return Match(None, words=names, reason=f"unmapped: {', '.join(unknown)}")
        distinct = sorted(set(classes.values()))
        if len(distinct) > 1:
            return Match(None, words=names, reason=f"instruments disagree: {', '.join(distinct)}")
        return Match(distinct[0], words=names)

    def suggest_from_filename(self, file_name: str) -> Match:
        """Class suggested by the whole words of a file name; the longest mapped run wins.

        Runs are looked up with spaces ("bass guitar"), without ("hihat") and with hyphens
        ("hi-hat"). Equally long runs that disagree leave the stem unmapped.
        """
        words = filename_words(file_name)
        match = self._longest_run(words, file_name)
        if match.cls is None and not match.reason.startswith("words disagree"):
            # "Guitars.wav", "Pianos L.wav": a plural the mapping does not list is its singular.
            singular = [_singular(w) for w in words]
            if singular != words:
                plural = self._longest_run(singular, file_name)
                if plural.cls is not None:
                    return plural
        return match

    def _longest_run(self, words: list[str], file_name: str) -> Match:
        found: dict[str, str] = {}
        for n in range(min(_MAX_WORDS, len(words)), 0, -1):
            for i in range(len(words) - n + 1):
                run = words[i:i + n]
                for key in (" ".join(run), "".join(run), "-".join(run)):
                    klass = self.entries.get(key)
                    if klass is not None:
                        found.setdefault(key, klass)
                        break
            if found:
                break
        if not found:
            return Match(None, words=words, reason=f"no mapped word in {file_name!r}")
        classes = sorted(set(found.values()))
        if len(classes) > 1:
            return Match(None, words=sorted(found), reason=f"words disagree: {found}")
        return Match(classes[0], suggested=True, words=sorted(found))


def _singular(word: str) -> str:
    """"guitars" -> "guitar"; words ending in "ss" ("bass") and short ones are left alone."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def user_entries(data: DataRoot) -> dict[str, str]:
    path = data.join(*USER_MAPPING_PARTS)
    if not path.is_file():
        return {}
    return _validate_entries(_read_yaml(path), str(path))


def update_user_mapping(data: DataRoot, set_entries: dict[str, str] | None = None,
                        remove: list[str] | None = None) -> dict[str, str]:
    """Add/override entries and remove names from the user's mapping file; returns its entries.

    Removing a name only drops the user's entry (a shipped default comes back into force).
    """
    current = user_entries(data)
    current.update(_validate_entries(set_entries or {}, "request"))
    for name in remove or []:
        current.pop(normalize_name(name), None)
    path = data.join(*USER_MAPPING_PARTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# User additions to the instrument mapping (merged over the shipped defaults).\n"
    atomic_write_text(path, header + yaml.safe_dump(dict(sorted(current.items())), allow_unicode=True))
    return current
