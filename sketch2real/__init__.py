"""sketch2real: teach Stable Diffusion a drawing style on Sketchy, and measure it."""

__version__ = "0.1.0"
