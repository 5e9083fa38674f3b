"""doit entry point. The tasks live in the pipeline/tasks/ package; `doit list` shows them.

Build host: `doit pack`. Container: `doit install serve`. See README.md.
"""

from pipeline.tasks import dodo_namespace

globals().update(dodo_namespace())
