"""sdlora: teach Stable Diffusion one person's face with LoRA."""

__version__ = "0.1.0"
