"""Non-learned estimates every model is compared with: the mixture, the oracle ratio mask, HPSS.

All take and return arrays (samples,) at one rate; no I/O. The STFT settings are the model's own
(model/config.py: n_fft 1536, hop 384, periodic Hann, centred with reflect padding, as
model/spectral.py computes it), so the oracle mask is the best a mask on the model's own grid could do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BASELINES = ("mixture", "oracle", "hpss")
DEFAULT_BASELINES = ("mixture", "oracle")


@dataclass(frozen=True)
class StftSettings:
    n_fft: int
    hop_length: int
    window: str = "hann"
    center: bool = True
    pad_mode: str = "reflect"

    def as_dict(self) -> dict:
        return {"n_fft": self.n_fft, "hop_length": self.hop_length, "window": self.window,
                "center": self.center, "pad_mode": self.pad_mode}


def model_stft_settings(model_config: dict | None = None) -> StftSettings:
    """STFT settings of the model: from its exported config when given, else model/config.py's defaults."""
    from model.config import ModelConfig, config_from_dict

    config = config_from_dict(model_config) if model_config else ModelConfig()
    return StftSettings(n_fft=config.n_fft, hop_length=config.hop_length, window=config.window)


def validate_baselines(names) -> tuple[str, ...]:
    """Known baseline names in a stable order, duplicates removed; ValueError for unknown ones."""
    names = [n.strip() for n in names if n and n.strip()]
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {list(BASELINES)}")
    return tuple(b for b in BASELINES if b in names)


def mixture_estimate(mix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mix as the estimate of both sources (the usual "do nothing" reference). mix: (samples,)."""
    return mix.copy(), mix.copy()


def oracle_ratio_mask(
    instrument: np.ndarray, rest: np.ndarray, stft: StftSettings, eps: float = 1e-10
) -> tuple[np.ndarray, np.ndarray]:
    """Ideal ratio mask |S_inst| / (|S_inst| + |S_rest|) on the mix STFT, with the mix phase.

    instrument, rest: (samples,). Returns (instrument estimate, rest = mix - instrument), (samples,)
    each, so the estimates sum to the mix exactly like the model's outputs do.
    """
    mix = instrument + rest
    spec_inst = np.abs(_stft(instrument, stft))
    spec_rest = np.abs(_stft(rest, stft))
    mask = spec_inst / (spec_inst + spec_rest + eps)
    estimate = _istft(mask * _stft(mix, stft), stft, len(mix))
    return estimate, mix - estimate


def hpss_estimate(mix: np.ndarray, stft: StftSettings) -> tuple[np.ndarray, np.ndarray]:
    """Harmonic part of a harmonic/percussive split as the instrument (guitar and piano are harmonic).

    mix: (samples,). Returns (harmonic, mix - harmonic).
    """
    import librosa

    harmonic_spec, _ = librosa.decompose.hpss(_stft(mix, stft))
    harmonic = _istft(harmonic_spec, stft, len(mix))
    return harmonic, mix - harmonic


def _stft(signal: np.ndarray, stft: StftSettings) -> np.ndarray:
    import librosa

    return librosa.stft(np.asarray(signal, np.float32), n_fft=stft.n_fft, hop_length=stft.hop_length,
                        window=stft.window, center=stft.center, pad_mode=stft.pad_mode)


def _istft(spectrum: np.ndarray, stft: StftSettings, length: int) -> np.ndarray:
    import librosa

    return librosa.istft(spectrum, hop_length=stft.hop_length, window=stft.window, center=stft.center,
                         length=length).astype(np.float64)
