"""doit entry point. The tasks live in pipeline/tasks.py; `doit list` shows them.

Build host: `doit pack`. Container: `doit install serve`. See README.md.
"""

from pipeline.tasks import dodo_namespace

globals().update(dodo_namespace())
