"""Networks: plain Keras models that know nothing of diffusion."""
from keras_progdist.networks.unet import (AttentionBlock, ResBlock, TimeEmbedding,
                                          UNet)

__all__ = ["AttentionBlock", "ResBlock", "TimeEmbedding", "UNet"]
