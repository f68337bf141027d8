"""Training orchestration: the configuration schema (`config`), stopping and resuming
at an exact step (`preemption`), the teacher and the distillation ladder of one run
(`experiment`), and the modes in order (`run`)."""
