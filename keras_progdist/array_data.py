"""A TensorFlow-free input pipeline: shuffled numpy batches from in-memory arrays.

The in-memory datasets (`mnist_embedded`, `fashion_mnist`) fit in host memory, so on a
host without TensorFlow (the JAX GPU machine) they are preprocessed once with
`keras.ops` and served as numpy batches. `model.fit` takes the stream as a Python
generator (`ArrayBatches.stream()`), on every backend.

The stream is a pure function of `seed`: epoch `e` visits the examples in the order
`np.random.default_rng([seed, e]).permutation(n)`, and flips (if asked) are drawn from
the same generator, so two streams with one seed are equal batch for batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class ArrayBatches:
    """Batches of float32 images in [-1, 1] (NHWC): tuples `(x,)` or `(x, label)`.

    Args:
        images: float32 `(N, H, W, C)` in [-1, 1], already preprocessed.
        labels: int32 `(N,)`, or None for unlabelled data.
        batch_size: examples per batch.
        shuffle: a new permutation every epoch.
        seed: seed of the permutations and flips.
        repeat: run forever (else one epoch).
        with_labels: yield `(x, label)` instead of `x`.
        random_flip: flip each example left-right with probability 1/2.
        drop_remainder: drop an epoch's last partial batch (static shapes; with
            `repeat`, batches never straddle two epochs).
        shard: `(index, count)`: keep examples `index::count`, e.g. one JAX process
            of several.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, batch_size: int,
                 shuffle: bool = True, seed: int = 0, repeat: bool = True,
                 with_labels: bool = False, random_flip: bool = False,
                 drop_remainder: bool = True, shard: tuple = (0, 1)):
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard=(index, count) needs 0 <= index < count, got {shard}.")
        self.images = np.ascontiguousarray(images[index::count], dtype=np.float32)
        self.labels = None if labels is None else np.asarray(labels[index::count], np.int32)
        if with_labels and self.labels is None:
            raise ValueError("with_labels=True, but the data has no labels.")
        if len(self.images) < batch_size and drop_remainder:
            raise ValueError(f"batch_size={batch_size} is larger than the {len(self.images)} "
                             "examples and drop_remainder=True: no batch would come out.")
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.repeat = shuffle, int(seed), repeat
        self.with_labels, self.random_flip = with_labels, random_flip
        self.drop_remainder = drop_remainder

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    @property
    def num_examples(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator:
        return self.stream()

    def stream(self):
        """A generator of batches (a new one starts from the first epoch again)."""
        n, b = len(self.images), self.batch_size
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            stop = n - n % b if self.drop_remainder else n
            for start in range(0, stop, b):
                idx = order[start:start + b]
                x = self.images[idx]
                if self.random_flip:
                    flip = rng.random(len(idx)) < 0.5
                    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
                # Keras takes generator items as tuples: (x,) or (x, label), which it
                # unpacks as tf.data's x or (x, label).
                yield (x, self.labels[idx]) if self.with_labels else (x,)
            epoch += 1
            if not self.repeat:
                return
