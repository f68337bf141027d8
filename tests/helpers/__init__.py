"""What the tests share: runners and settings of whole runs (`pipeline_runs`), a work
directory as a finished run leaves it (`finished_workdir`), multi-process clusters
(`cluster_runs`), and the scripts the tests start as processes (workers, wrappers that
make TensorFlow unimportable or audit a process's writes).

Imported as `helpers.<module>`: pytest puts `tests/` on `sys.path` (rootdir-relative
test modules without an `__init__.py` of their own)."""
