"""The training cache encodes in batches: images of one bucket size together, never more pixels per VAE
call than ENCODE_PIXELS (FLUX.1's VAE at 1024x1024 on a shared GPU), captions ENCODE_BATCH at a time."""

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
