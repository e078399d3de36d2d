"""pipefit: make a diffusers pipeline fit, and run well, on the hardware at hand."""

__version__ = "0.1.0"
