"""Synthetic multitrack generator: composed songs rendered per instrument with FluidSynth."""

from services.ingestion.synth.generate import generate_songs, render_midi_file

__all__ = ["generate_songs", "render_midi_file"]
