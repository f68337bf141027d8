"""The whole job, resumable: teacher -> distillation stages -> export -> evaluation.

The public face of `keras_progdist.training` (what `bin/run.py`, the benchmarks and
users call): `run(workdir, mode, ...)`, `Experiment`, the gin configurables and the
errors. The work directory's layout is documented in `keras_progdist.workdir`.
"""

from keras_progdist.training.config import (  # noqa: F401
                                            MODES,
                                            PipelineError,
                                            ScheduleConfigurable,
                                            UNetConfigurable,
                                            dataset_settings,
                                            diffusion,
                                            distill,
                                            evaluate,
                                            stage_ladder,
                                            teacher,
)
from keras_progdist.training.experiment import SAMPLE_SEED, Experiment  # noqa: F401
from keras_progdist.training.preemption import (  # noqa: F401
                                            PreemptionGuard,
                                            StepCheckpoint,
                                            TrainingDivergedError,
                                            input_at,
                                            resumable_fit,
)
from keras_progdist.training.run import run  # noqa: F401
