"""latent-sindy: analysis (trajectories, SINDy library/fit/report, quality metrics)."""
