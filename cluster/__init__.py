"""latent-sindy: cluster."""
