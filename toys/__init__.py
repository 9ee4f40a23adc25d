"""Small FLUX.1s made here for tests and the demo: the tiny random model, the shapes world, flux-mini."""
