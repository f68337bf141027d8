"""keras-progdist: progressive distillation of diffusion models in Keras 3.

Importing the package registers every serializable class (networks, models, schedules,
learning-rate schedules), so `keras.saving.load_model("stage.keras")` needs no
`custom_objects`, compiled models included. Keras has no entry point that would import
a package for a file it loads, so `import keras_progdist` must come first.
"""

from keras_progdist import diffusion, distillation, guided_distillation, optimizers, schedules  # noqa: F401
from keras_progdist.diffusion import DiffusionModel  # noqa: F401
from keras_progdist.distillation import Distiller  # noqa: F401
from keras_progdist.guided_distillation import GuidanceDistiller  # noqa: F401
from keras_progdist.networks import UNet  # noqa: F401

__version__ = "0.1.0"
