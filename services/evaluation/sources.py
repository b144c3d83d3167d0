"""Where a model's estimates come from: a served model, an exported SavedModel, a training run, a folder.

Every source answers `separate(mix, rate_hz, track) -> (instrument, rest)` on mono arrays at the
dataset's rate, so the evaluation loop does not care which it is. TensorFlow and the serving
client are imported only by the sources that need them.
"""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from model.config import ConfigError, config_from_dict, config_to_dict, with_inference_overrides
from services.common import paths
from services.common.audio import AudioError, read_audio, resample
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.paths import DataRoot, PathError, safe_join

# An estimate may be this much longer or shorter than the mix (codec padding) and is trimmed/padded.
LENGTH_TOLERANCE_SECONDS = 0.1


class MissingEstimateError(NotFoundError):
    """No estimate for this one track; the track is skipped, the evaluation goes on."""


class UnusableEstimateError(InvalidArgumentError):
    """An estimate file of one track cannot be scored (wrong length); the track is skipped."""


class ModelSource(abc.ABC):
    """Base of all estimate sources."""

    kind = ""

    @abc.abstractmethod
    def provenance(self) -> dict:
        """What produced the estimates, for the report."""

    def model_config(self) -> dict | None:
        """The model's config (model/config.py fields) when known, for the oracle's STFT settings."""
        return None

    @abc.abstractmethod
    def separate(self, mix: np.ndarray, rate_hz: int, track: str) -> tuple[np.ndarray, np.ndarray]:
        """mix: (samples,) float32 mono at rate_hz. Returns (instrument, rest), (samples,) each."""

    def verify(self) -> None:  # noqa: B027 (optional hook: most sources need no check)
        """Check that the model can be reached (cheaply; before a job is queued)."""

    def close(self) -> None:  # noqa: B027 (optional hook: most sources hold nothing)
        pass


def parse_model_ref(text: str) -> tuple[str, int | None]:
    """"guitar" -> ("guitar", None); "guitar:3" -> ("guitar", 3)."""
    try:
        return paths.parse_model_ref(text)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from e


def fit_length(signal: np.ndarray, samples: int) -> np.ndarray:
    """Trim or zero-pad a (samples',) estimate to exactly `samples`."""
    signal = np.asarray(signal, np.float32).reshape(-1)
    return signal[:samples] if len(signal) >= samples else np.pad(signal, (0, samples - len(signal)))


def _check_length(signal: np.ndarray, samples: int, rate_hz: int, what: str) -> None:
    if abs(signal.shape[-1] - samples) > LENGTH_TOLERANCE_SECONDS * rate_hz:
        raise UnusableEstimateError(
            f"{what} has {signal.shape[-1]} samples but the mix has {samples} (at {rate_hz} Hz): "
            "estimates must cover the whole track")


class EstimatesFolderSource(ModelSource):
    """Precomputed estimates: <root>/<track>/instrument.wav and optionally rest.wav (else mix - instrument)."""

    kind = "estimates"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotFoundError(f"estimates folder {self.root} does not exist")

    def provenance(self) -> dict:
        return {"kind": self.kind, "estimates_dir": str(self.root.resolve())}

    def separate(self, mix, rate_hz, track):
        try:
            folder = safe_join(self.root, track)
        except PathError as e:
            raise MissingEstimateError(str(e)) from e
        instrument_path = _find_audio(folder, "instrument")
        if instrument_path is None:
            raise MissingEstimateError(f"no instrument estimate for track {track} in {folder}")
        try:
            instrument = read_audio(instrument_path, rate=rate_hz, mono=True)[0][0]
            _check_length(instrument, len(mix), rate_hz, str(instrument_path))
            instrument = fit_length(instrument, len(mix))
            rest_path = _find_audio(folder, "rest")
            if rest_path is None:
                rest = mix - instrument
            else:
                rest = read_audio(rest_path, rate=rate_hz, mono=True)[0][0]
                _check_length(rest, len(mix), rate_hz, str(rest_path))
                rest = fit_length(rest, len(mix))
        except AudioError as e:
            raise MissingEstimateError(f"unreadable estimate for track {track}: {e}") from e
        return instrument, rest


def _find_audio(folder: Path, stem: str) -> Path | None:
    for suffix in (".wav", ".flac", ".mp3"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


class _WaveformModelSource(ModelSource):
    """A model that maps (batch, samples) waveforms at its own rate to instrument and rest."""

    model_rate_hz: int | None = None

    @abc.abstractmethod
    def _run(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(batch, samples) at the model's rate -> (instrument, rest), same shape."""

    def separate(self, mix, rate_hz, track):
        model_rate = self.model_rate_hz or rate_hz
        audio = np.asarray(mix, np.float32)[np.newaxis]
        if model_rate != rate_hz:
            audio = resample(audio, rate_hz, model_rate)
        instrument, _ = self._run(audio)
        instrument = np.asarray(instrument, np.float32).reshape(1, -1)
        if model_rate != rate_hz:
            instrument = resample(instrument, model_rate, rate_hz)
        instrument = fit_length(instrument[0], len(mix))
        # rest = mix - instrument holds for our models by construction; computing it here keeps it
        # exact after resampling too.
        return instrument, np.asarray(mix, np.float32) - instrument


class SavedModelSource(_WaveformModelSource):
    """An exported SavedModel folder (models/<name>/<version>/ layout), run in this process."""

    kind = "saved_model"

    def __init__(self, path: str | Path, overrides: dict | None = None):
        self.path = Path(path)
        if not (self.path / "saved_model.pb").is_file():
            raise NotFoundError(f"{self.path} is not a SavedModel folder (no saved_model.pb)")
        self.info = _export_info(self.path)
        self.model_rate_hz = int(self.info["rate_hz"]) if self.info.get("rate_hz") else None
        self._signature = None
        # With overrides the export's weights are read into networks of its recorded configs (an
        # ensemble's members too) and applied here: the serving signature has the export's
        # mask_exponent etc. built in.
        self.overrides = dict(overrides or {})
        self.config = None
        self._networks = None
        self._excluded = None
        if self.overrides:
            if not isinstance(self.info.get("config"), dict):
                raise FailedPreconditionError(
                    f"{self.path} records no network config (assets.extra/stemlab.json), so it can only "
                    "be applied as exported")
            try:
                self.config = with_inference_overrides(config_from_dict(self.info["config"]), self.overrides)
            except ConfigError as e:
                raise InvalidArgumentError(str(e)) from e

    def provenance(self) -> dict:
        extra = {k: v for k, v in self.info.items() if k != "config"}
        found = {"kind": self.kind, "saved_model": str(self.path.resolve()), "rate_hz": self.model_rate_hz,
                 "export_info": extra}
        if self.overrides:
            found["overrides"] = self.overrides
        return found

    def model_config(self):
        return config_to_dict(self.config) if self.config is not None else self.info.get("config")

    def _run(self, waveform):
        import tensorflow as tf

        if self.config is not None:
            return self._run_with_overrides(tf.constant(waveform, tf.float32))
        if self._signature is None:
            loaded = tf.saved_model.load(str(self.path))
            if "serving_default" not in loaded.signatures:
                raise FailedPreconditionError(f"{self.path} has no serving_default signature")
            self._loaded = loaded  # the signature needs its object kept alive
            self._signature = loaded.signatures["serving_default"]
        outputs = self._signature(waveform=tf.constant(waveform, tf.float32))
        if "instrument" not in outputs:
            raise FailedPreconditionError(f"{self.path}: serving_default has no 'instrument' output")
        return outputs["instrument"].numpy(), outputs.get("rest")

    def _run_with_overrides(self, waveform):
        from model.export import ExportError, load_excluded_networks, load_exported_networks
        from model.separate import separate_waveform

        if self._networks is None:
            try:  # an ensemble's members too, as the export serves them (batch norm folded)
                self._networks = load_exported_networks(self.path, folded=True)[0]
                # and the model it leaves out, as it was exported (the overrides are this model's)
                excluded = load_excluded_networks(self.path, folded=True)
            except ExportError as e:
                raise FailedPreconditionError(str(e)) from e
            self._excluded = (excluded.networks, excluded.config) if excluded else None
        instrument, rest = separate_waveform(self._networks, waveform, self.config, self._excluded)
        return instrument.numpy(), rest.numpy()


def _export_info(version_dir: Path) -> dict:
    """The export's stemlab.json, {} for a SavedModel made elsewhere (then applied as it is)."""
    from model.export import ExportError, read_export_info

    try:
        return read_export_info(version_dir, missing_ok=True)
    except ExportError as e:
        raise FailedPreconditionError(str(e)) from e


class ServedModelSource(ModelSource):
    """A model behind TF Serving (or our compatible server), through the serving room's client."""

    kind = "served_model"

    def __init__(self, name: str, version: int | None, address: str, models_root: Path | None = None):
        self.name, self.version, self.address = name, version, address
        self.models_root = models_root  # where this data root's exports are (served from here, most often)
        try:
            from services.serving import client
        except ImportError as e:
            raise FailedPreconditionError(f"the serving client is not available: {e}") from e
        self._client = client
        # One connection for all tracks; it also learns which version answered.
        self._served = client.ServedModel(name, address=address, version=version)

    def verify(self) -> None:  # noqa: B027 (optional hook: most sources need no check)
        try:
            _ = self._served.sample_rate_hz  # asks the server: model known, rate sane
        except self._client.ServingError as e:
            raise FailedPreconditionError(f"served model {self.name} at {self.address}: {e}") from e

    def provenance(self) -> dict:
        try:
            rate_hz = self._served.sample_rate_hz  # cached after the first track
        except self._client.ServingError:
            rate_hz = None
        return {"kind": self.kind, "model": self.name, "version": self.version,
                "served_version": self._served.served_version, "address": self.address, "rate_hz": rate_hz}

    def model_config(self) -> dict | None:
        """The served version's network config, from its export in this data root: the oracle and
        the other baselines are computed on the model's own STFT grid (with the defaults, a model of
        another n_fft got another oracle than the same weights evaluated as a run). None when
        that export is not here (a model served from elsewhere): the defaults then."""
        if self.models_root is None:
            return None
        try:
            version = self.version or self._served.served_version
            if version is None:
                _ = self._served.sample_rate_hz  # one call; the reply names the version that answered
                version = self._served.served_version
        except self._client.ServingError:
            return None
        folder = self.models_root / self.name / str(version)
        return _export_info(folder).get("config") if version is not None and folder.is_dir() else None

    def separate(self, mix, rate_hz, track):
        # The client resamples, splits long audio and overlap-adds; it answers at the rate it was given.
        instrument, _ = self._client.separate_array(
            np.asarray(mix, np.float32)[np.newaxis], rate_hz, model=self.name, address=self.address,
            version=self.version, served_model=self._served)
        instrument = fit_length(np.asarray(instrument).reshape(-1), len(mix))
        return instrument, np.asarray(mix, np.float32) - instrument

    def close(self) -> None:  # noqa: B027 (optional hook: most sources hold nothing)
        self._served.close()


class RunSource(_WaveformModelSource):
    """A training run, DATA/runs/<run>/: its best weights, read through model/checkpoint.py."""

    kind = "run"

    def __init__(self, data: DataRoot, run: str, overrides: dict | None = None):
        from model.checkpoint import BEST_WEIGHTS, read_run

        try:
            self.folder = safe_join(data.runs, run)
        except PathError as e:
            raise InvalidArgumentError(str(e)) from e
        self.run = run
        self.info = read_run(self.folder)  # NotFoundError when there is no such run
        if not (self.folder / BEST_WEIGHTS).is_file():
            raise FailedPreconditionError(f"run {run!r} has no best weights yet (no epoch finished)")
        self.overrides = dict(overrides or {})
        try:
            self.config = with_inference_overrides(config_from_dict(self.info.get("config") or {}), self.overrides)
        except ConfigError as e:
            raise InvalidArgumentError(str(e)) from e
        self.model_rate_hz = self.config.rate_hz
        self._network = None

    def provenance(self) -> dict:
        return {"kind": self.kind, "run": self.run, "weights": "best.weights.h5",
                "best_epoch": self.info.get("best_epoch"), "best_val_loss": self.info.get("best_val_loss"),
                "preset": self.info.get("preset"), "rate_hz": self.model_rate_hz, "overrides": self.overrides}

    def model_config(self):
        return config_to_dict(self.config)

    def _run(self, waveform):
        import tensorflow as tf

        from model.checkpoint import load_best_network
        from model.network import fold_batch_norm
        from model.separate import separate_waveform

        if self._network is None:
            # As an export of this run would serve it: batch norm folded (the same mask, faster).
            self._network = fold_batch_norm(*load_best_network(self.folder))
        instrument, rest = separate_waveform(self._network, tf.constant(waveform, tf.float32), self.config)
        return instrument.numpy(), rest.numpy()


def open_source(data: DataRoot, *, model: str = "", run: str = "", estimates_dir: str = "",
                saved_model_dir: str = "", serving_address: str = "localhost:8500",
                overrides: dict | None = None) -> ModelSource:
    """The one source a request names (exactly one of model, run, estimates_dir, saved_model_dir).

    `overrides` (config.INFERENCE_KEYS, e.g. mask_exponent) change how a run's or a SavedModel's
    network is applied; served models and estimates have no network here, so they are refused there.
    """
    given = [k for k, v in (("model", model), ("run", run), ("estimates_dir", estimates_dir),
                            ("saved_model_dir", saved_model_dir)) if v]
    if len(given) != 1:
        raise InvalidArgumentError(
            f"name exactly one of model, run, estimates_dir, saved_model_dir (got {given or 'none'})")
    if overrides and not (run or saved_model_dir):
        raise InvalidArgumentError(f"overrides {sorted(overrides)} apply to a training run or a SavedModel "
                                   "folder only (export with them to change a served model)")
    if model:
        name, version = parse_model_ref(model)
        return ServedModelSource(name, version, serving_address, data.models)
    if run:
        return RunSource(data, run, overrides)
    if estimates_dir:
        return EstimatesFolderSource(estimates_dir)
    return SavedModelSource(saved_model_dir, overrides)
