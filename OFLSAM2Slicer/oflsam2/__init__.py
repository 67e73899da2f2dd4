"""OFL-SAM2 engine: segment a whole volume from a few painted slices.

Pure Python: never imports ``slicer`` or ``qt``.
"""

__version__ = "0.1.0"
