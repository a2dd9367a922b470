"""
Batching of task-state updates by DAG run.

Modules: :mod:`.settings` (the ``[dagrun_batching]`` section), :mod:`.updates` (updates and outcomes),
:mod:`.coalescing` (grouping by DAG run), :mod:`.applying` (one transaction per group),
:mod:`.transport` (supervisor to executor), :mod:`.worker` (the supervisor's client) and
:mod:`.executor` (``BatchingLocalExecutor``).
"""
