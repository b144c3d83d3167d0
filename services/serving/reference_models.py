"""Tiny SavedModels that follow the served-model contract (identity and fixed-gain "separators").

They let tests, benchmarks and a fresh deployment exercise the whole serving path without a
trained network: ``serving_default`` maps ``waveform`` [batch, samples] to ``instrument`` and
``rest`` (= waveform - instrument), and ``sample_rate`` answers the model's rate.
"""

from pathlib import Path

import tensorflow as tf


class _GainSeparator(tf.Module):
    """instrument = gain * waveform; gain 1.0 is the identity model."""

    def __init__(self, gain: float, sample_rate_hz: int):
        super().__init__()
        self.gain = tf.constant(gain, tf.float32)
        self.sample_rate_hz = tf.constant(sample_rate_hz, tf.int32)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="waveform")])
    def separate(self, waveform):
        instrument = waveform * self.gain
        return {"instrument": instrument, "rest": waveform - instrument}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def sample_rate(self, x):
        return {"sample_rate": tf.fill(tf.shape(x), self.sample_rate_hz)}


def save_gain_model(export_dir: str | Path, gain: float = 1.0, sample_rate_hz: int = 22050) -> Path:
    """Write a contract-following SavedModel to ``export_dir`` (a version folder) and return it.

    The caller publishes it (e.g. by renaming a temp folder to ``models/<name>/<version>``).
    """
    export_dir = Path(export_dir)
    module = _GainSeparator(gain, sample_rate_hz)
    tf.saved_model.save(
        module,
        str(export_dir),
        signatures={"serving_default": module.separate, "sample_rate": module.sample_rate},
    )
    return export_dir
