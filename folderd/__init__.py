"""folderd: a watched-folder image upscaler (Clipdrop API or an embedded local engine)."""

__version__ = "0.1.0"
