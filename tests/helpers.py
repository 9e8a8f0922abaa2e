"""Small builders shared by the test files (imported as `from helpers import ...`; pytest puts tests/ on sys.path)."""

from dev2pro.train.data_loading import InMemoryDataset, TrainData, encode_prompts


def toy_data(n: int = 8, seed: int = 0, prompts=()) -> TrainData:
    """`n` toy-world images, encoded with the toy autoencoder and text encoder, as in-memory training data."""
    from dev2pro.toy.world import ToyAutoencoder, ToyTextEncoder, make_batch

    images, captions, _ = make_batch(n, seed)
    text = ToyTextEncoder()
    txt, pooled = text.encode(captions)
    return TrainData(dataset=InMemoryDataset(ToyAutoencoder().encode(images), txt, pooled, captions),
                     prompts=encode_prompts(text, list(prompts)), info={"resolution": 32, "dataset_size": n})
