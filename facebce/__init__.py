"""facebce: open-set face recognition at a single global threshold."""

__version__ = "0.1.0"
