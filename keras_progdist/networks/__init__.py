"""Networks: plain Keras models that know nothing of diffusion."""
from keras_progdist.networks.blocks import AttentionBlock, ResBlock, TimeEmbedding
from keras_progdist.networks.unet import UNet

__all__ = ["AttentionBlock", "ResBlock", "TimeEmbedding", "UNet"]
