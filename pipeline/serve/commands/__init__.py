"""What ``doit plan | serve | status | stop | logs | clients | k8s`` do: one module per verb.

The tasks (:mod:`pipeline.tasks.serve`) import the verb they run, and only that one:
``status``, ``stop`` and ``logs`` must start fast, so config, plan and supervisor load on
demand. :mod:`~pipeline.serve.commands.common` holds what several verbs share.

Each verb takes the settings and the process environment explicitly, prints its report, and
raises :class:`~pipeline.errors.PipelineError` subclasses for anything a user can fix.
"""
