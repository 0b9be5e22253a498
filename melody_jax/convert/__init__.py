"""Converters from public checkpoints (Hugging Face MusicGen / EnCodec directories) to our trees.

They read the files with numpy alone (no torch), so a user converts downloaded weights once and
the rest of the project only ever sees our bundles.
"""
