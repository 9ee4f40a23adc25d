"""flux-mini: a small FLUX.1 of the real classes, trained here on the synthetic shapes world.

    python -m toys.mini.build            # VAE, then transformer, then weights/flux-mini/FLUX.1-{dev,schnell}

spec.py holds the architecture numbers, text.py the word-level tokenizers and frozen text encoders,
vae_training.py and transformer_training.py the two training stages, build.py the one command.
"""
