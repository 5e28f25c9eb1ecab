"""latent-sindy: training."""
