"""The training cache encodes in batches: images of one bucket size together, never more pixels per VAE
call than ENCODE_PIXELS (FLUX.1's VAE at 1024x1024 on a shared GPU), captions ENCODE_BATCH at a time."""

import torch

from training.buckets import Sample
from training.cache import ENCODE_BATCH, ENCODE_PIXELS, _runs


def sample(side: int) -> Sample:
    return Sample(index=0, width=side, height=side, resolution=side)


def test_image_batches_keep_one_size_and_stay_under_the_pixel_cap():
    samples = [sample(1024)] * 5 + [sample(256)] * 40 + [sample(1024)]
    runs = _runs(samples, lambda s: (s.width, s.height), lambda s: ENCODE_PIXELS // (s.width * s.height))
    assert [len(r) for r in runs] == [2, 2, 1, 32, 8, 1]
    assert [i for r in runs for i in r] == list(range(len(samples)))  # every sample once, in order
    assert all(len({(samples[i].width, samples[i].height) for i in r}) == 1 for r in runs)


def test_an_image_larger_than_the_cap_is_encoded_alone():
    runs = _runs([sample(2048)] * 3, lambda s: s.width, lambda s: ENCODE_PIXELS // (s.width * s.height))
    assert runs == [[0], [1], [2]]


def test_caption_batches():
    runs = _runs(list(range(70)), lambda _: 0, lambda _: ENCODE_BATCH)
    assert [len(r) for r in runs] == [32, 32, 6]


def test_a_dropped_caption_is_the_trigger_word_alone(tiny_models):
    """As the public trainer: caption dropout keeps the trigger word, so dropped steps still tie the
    subject to it (an empty caption would pull prompts without the word towards the subject)."""
    from PIL import Image

    from training.cache import build_cache

    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    samples = [Sample(0, 64, 64, 64), Sample(1, 64, 64, 64)]
    captions = ["TOK, a red square", "TOK, a blue square"]
    kept = build_cache(tiny_models, images, captions, samples, 16, None, dropout_caption="TOK")
    assert kept.dropout_caption == 2 and kept.dropout_caption not in kept.caption_of_sample
    default = build_cache(tiny_models, images, captions, samples, 16, None)  # "" (flux-mini's build)
    assert not torch.equal(kept.texts.get("2")["prompt"], default.texts.get("2")["prompt"])
