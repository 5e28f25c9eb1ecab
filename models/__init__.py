"""latent-sindy: models."""
