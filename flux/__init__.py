"""FLUX.1 itself: variants, sizes, request rules, loading, generation, images, output, safety, go_fast."""
