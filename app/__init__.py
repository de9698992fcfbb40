"""vae-service: serve a trained VAE artifact over REST."""

__version__ = "0.1.0"
