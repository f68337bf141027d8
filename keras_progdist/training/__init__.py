"""Training orchestration, the library's entry point for a whole run: the configuration
schema (`config`), stopping and resuming at an exact step (`preemption`), the teacher
and the distillation ladder of one run (`experiment`), and the modes in order (`run`).

    from keras_progdist import training
    training.run("runs/tiny", "all")        # after gin has parsed the config
"""

from keras_progdist.training.config import (
                                            MODES,
                                            PipelineError,
                                            ScheduleConfigurable,
                                            UNetConfigurable,
                                            dataset_settings,
                                            diffusion,
                                            distill,
                                            evaluate,
                                            guidance,
                                            sample_grid,
                                            stage_ladder,
                                            teacher,
)
from keras_progdist.training.experiment import SAMPLE_SEED, Experiment
from keras_progdist.training.preemption import (
                                            PreemptionGuard,
                                            StepCheckpoint,
                                            TrainingDivergedError,
                                            input_at,
                                            resumable_fit,
)
from keras_progdist.training.run import run

__all__ = ["MODES", "SAMPLE_SEED", "Experiment", "PipelineError", "PreemptionGuard",
           "ScheduleConfigurable", "StepCheckpoint", "TrainingDivergedError",
           "UNetConfigurable", "dataset_settings", "diffusion", "distill", "evaluate",
           "guidance", "input_at", "resumable_fit", "run", "sample_grid", "stage_ladder",
           "teacher"]
