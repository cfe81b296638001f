"""edgekit: distil, quantize, export, benchmark and package LLMs for small devices."""

__version__ = "0.1.0"
