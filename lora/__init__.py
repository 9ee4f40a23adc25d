"""LoRA files: reading and converting their formats, fusing them into the transformer, choosing a request's."""
