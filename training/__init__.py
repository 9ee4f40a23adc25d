"""LoRA training: from a zip of images (job.py) through the dataset, cache and loop to the weights tar."""
