"""keras-progdist: progressive distillation of diffusion models in Keras 3.

Importing the package registers every serializable class, so
`keras.saving.load_model("stage.keras")` needs no `custom_objects`.
"""

from keras_progdist import diffusion, distillation, schedules  # noqa: F401
from keras_progdist.diffusion import DiffusionModel  # noqa: F401
from keras_progdist.distillation import Distiller  # noqa: F401
from keras_progdist.networks import UNet  # noqa: F401

__version__ = "0.1.0"
