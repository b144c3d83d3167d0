"""Model configuration: the spectral front end, the network shape and its presets.

One validated object describes everything needed to rebuild a network and its STFT exactly
(training, export, serving and evaluation all read it). Defaults live here and nowhere else.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A preset name or an override is unknown or gives an impossible network."""


class ModelConfig(BaseModel):
    """Everything that defines a separation network and its spectrogram.

    The network sees chunks of `freq_rows x chunk_frames` magnitudes, where
    `freq_rows = n_fft // 2` (the DC bin is dropped; the mask puts 0 there).
    """

    # allow_inf_nan: a learning rate of inf passed "> 0" and trained to NaN, reported as succeeded.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rate_hz: int = Field(22050, ge=4000, le=192000)
    n_fft: int = Field(1536, ge=16)
    hop_length: int = Field(384, ge=1)
    window: Literal["hann"] = "hann"
    chunk_frames: int = Field(64, ge=1)
    # Share of a chunk that overlaps the next one at separation time; masks are cross-faded there.
    chunk_overlap: float = Field(0.5, ge=0.0, lt=1.0)
    # How many chunks go through the network at once when separating (memory vs speed).
    inference_batch: int = Field(8, ge=1)
    # The separation mask is raised to this power (training never sees it). Below 1 softens it:
    # a mask that is unsure keeps more of the mix, so fewer artifacts and more bleed; above 1
    # sharpens it. Picked on validation songs after training (`stemlab export --set`).
    mask_exponent: float = Field(1.0, gt=0.0, le=4.0)

    front_filters: tuple[int, ...] = (64, 128, 128, 128, 256)
    front_kernels: tuple[int, ...] = (7, 3, 3, 3, 3)
    hourglass_depth: int = Field(6, ge=1)
    hourglass_filters: int = Field(192, ge=1)
    # Kernel of the skip-branch conv at every hourglass level (3 in the thesis; 1 is far cheaper at
    # the top level, which runs at full resolution).
    skip_kernel: int = Field(3, ge=1)
    head_filters: tuple[int, ...] = (256, 256)
    head_kernels: tuple[int, ...] = (3, 1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    # Keras' default; short runs (tests) need less, or inference-mode statistics lag far behind.
    batch_norm_momentum: float = Field(0.99, gt=0.0, lt=1.0)
    # Added to the chunk's peak magnitude before dividing, so silent chunks stay finite.
    normalise_eps: float = Field(1e-6, gt=0.0)
    # 0 feeds the peak-normalised linear magnitude to the network (the thesis). A positive k feeds
    # log1p(k * m) / log1p(k) instead: still 0..1, but quiet partials are no longer ~0, which a small
    # network cannot otherwise see. The mask still multiplies the linear magnitude, and the loss is
    # unchanged.
    input_log_scale: float = Field(0.0, ge=0.0)

    learning_rate: float = Field(1e-4, gt=0.0)

    @property
    def freq_rows(self) -> int:
        """Frequency rows the network sees: bins 1..n_fft//2 (DC dropped)."""
        return self.n_fft // 2

    @property
    def chunk_step_frames(self) -> int:
        """Frames between the starts of two neighbouring chunks when separating."""
        return max(1, int(round(self.chunk_frames * (1.0 - self.chunk_overlap))))

    @property
    def segment_samples(self) -> int:
        """Samples whose uncentred STFT gives exactly one chunk of `chunk_frames` frames."""
        return (self.chunk_frames - 1) * self.hop_length + self.n_fft

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.n_fft % 2:
            raise ValueError(f"n_fft must be even, got {self.n_fft}")
        if self.hop_length > self.n_fft:
            raise ValueError(f"hop_length {self.hop_length} is longer than n_fft {self.n_fft}")
        if len(self.front_filters) != len(self.front_kernels) or not self.front_filters:
            raise ValueError("front_filters and front_kernels must be non-empty and of equal length")
        if len(self.head_filters) != len(self.head_kernels):
            raise ValueError("head_filters and head_kernels must have equal length")
        if any(f < 1 for f in self.front_filters + self.head_filters):
            raise ValueError("filter counts must be positive")
        if any(k < 1 or k % 2 == 0 for k in self.front_kernels + self.head_kernels + (self.skip_kernel,)):
            raise ValueError("kernel sizes must be odd and positive")
        # Every hourglass level halves both axes, and upsampling must land on the same size.
        scale = 2**self.hourglass_depth
        if self.freq_rows % scale or self.chunk_frames % scale:
            raise ValueError(
                f"hourglass depth {self.hourglass_depth} needs freq rows ({self.freq_rows}) and "
                f"chunk_frames ({self.chunk_frames}) divisible by {scale}"
            )
        return self


# Thesis network: front 7x7/64, 3x3/128 x3, 3x3/256; one hourglass of depth 6 with 192 filters;
# head 3x3/256, 1x1/256, 1x1/1. 7,713,857 trainable parameters, as published.
_THESIS: dict[str, Any] = {}

# Chosen by bench/bench_model.py on a 2-core CPU. Full-resolution layers (768 x 64) dominate the
# thesis net's cost, so they shrink most: a narrow front, a 1x1 skip branch and a 1x1 head. The
# hourglass keeps its depth of 6 (the context the mask sees); 32 filters instead of 192.
# Log-compressed input and no dropout: on the guitar set, 3 epochs reached the validation loss that
# 12 epochs of the linear-input, dropout-0.2 network did (0.0035); dropout alone changed nothing.
_CPU: dict[str, Any] = {
    "input_log_scale": 1000.0,
    "dropout": 0.0,
    "front_filters": (8, 16),
    "front_kernels": (5, 3),
    "hourglass_depth": 6,
    "hourglass_filters": 32,
    "skip_kernel": 1,
    "head_filters": (16, 16),
    "head_kernels": (1, 1),
}

# For tests: small STFT, small chunks, a few thousand parameters; trains in seconds.
_TINY: dict[str, Any] = {
    "n_fft": 256,
    "hop_length": 64,
    "chunk_frames": 16,
    "front_filters": (8, 8),
    "front_kernels": (3, 3),
    "hourglass_depth": 3,
    "hourglass_filters": 8,
    "head_filters": (8,),
    "head_kernels": (1,),
    "dropout": 0.0,
    "batch_norm_momentum": 0.8,
    "learning_rate": 3e-3,
}

PRESETS: dict[str, dict[str, Any]] = {"thesis": _THESIS, "cpu": _CPU, "tiny": _TINY}

# What may change between training and export: how a trained network is applied, not its weights.
INFERENCE_KEYS = ("mask_exponent", "chunk_overlap", "inference_batch")
# What may differ between a network and the one whose weights start its training: how it trains
# and how the mask is applied. Everything else shapes the weights or what they mean (the spectrogram).
INIT_FREE_KEYS = ("learning_rate", "dropout", "batch_norm_momentum", *INFERENCE_KEYS)


def init_differences(source: dict[str, Any], config: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """(theirs, ours) for each key (beyond INIT_FREE_KEYS) where a source's recorded config differs
    from `config`; empty when its weights can start `config`'s network."""
    ours = config_to_dict(config)
    return {k: (source.get(k), ours[k]) for k in sorted(ours) if k not in INIT_FREE_KEYS and source.get(k) != ours[k]}


def init_mismatch(source: dict[str, Any], config: ModelConfig) -> list[str]:
    """`init_differences` as "key <theirs> there, <ours> here", for error messages."""
    return [f"{k} {theirs} there, {ours} here" for k, (theirs, ours) in init_differences(source, config).items()]


def _coerce_tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def make_config(preset: str = "thesis", overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The preset's config with `overrides` applied; unknown keys and bad values raise ConfigError."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(ModelConfig.model_fields))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known: {sorted(ModelConfig.model_fields)}")
    try:
        return ModelConfig(**_coerce_tuples({**PRESETS[preset], **overrides}))
    except ValidationError as e:
        raise ConfigError(f"invalid config for preset {preset!r}: {_short(e)}") from e


def config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Rebuild a config written with `config_to_dict` (run.yaml, assets.extra/stemlab.json)."""
    try:
        return ModelConfig(**_coerce_tuples(dict(values)))
    except ValidationError as e:
        raise ConfigError(f"invalid model config: {_short(e)}") from e


def with_inference_overrides(config: ModelConfig, overrides: dict[str, Any] | None) -> ModelConfig:
    """`config` with INFERENCE_KEYS changed; any other key (it would not fit the weights) raises ConfigError."""
    overrides = dict(overrides or {})
    other = sorted(set(overrides) - set(INFERENCE_KEYS))
    if other:
        raise ConfigError(f"{other} cannot change after training; at export only {list(INFERENCE_KEYS)} can")
    return config_from_dict({**config_to_dict(config), **overrides})


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """Plain YAML/JSON-safe dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.model_dump().items()}


def _short(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors())
