"""latent-sindy: analysis after training: sindy/ (engine), job/ (Ray job), report/, quality/; see docs/ARCHITECTURE.md."""
