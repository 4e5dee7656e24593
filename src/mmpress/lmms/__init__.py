"""The lmms-eval plugin: ``lmms-eval --model mmpress --model_args pretrained=PATH,press=divprune:64``.

Install with ``bash scripts/install_lmms.sh`` (the ``mmpress[lmms]`` extra under constraints that
keep the CPU torch). lmms-eval 0.7.3 finds the model through the ``lmms_eval.models`` entry point
(pyproject), which names :func:`manifest`; the model class is :class:`mmpress.lmms.model.MMPress`.

Tasks: lmms-eval 0.7.3 indexes task YAMLs from its own ``lmms_eval/tasks/`` folder and from
``--include_path`` only (``TaskManager.initialize_tasks``); its ``LMMS_EVAL_PLUGINS`` route adds a
plugin's folder after the task index is built, so it cannot find them either. lmms-eval loads the
model entry points when ``lmms_eval.models`` is imported, before the CLI builds its task index, so
:func:`manifest` adds :data:`TASKS_DIR` to every ``TaskManager``'s search path: ``--tasks
mmpress_easyvqa`` then works with no flag. ``--include_path`` to that folder works too.
"""

from __future__ import annotations

import logging
from pathlib import Path

#: the offline tasks shipped with the package: mmpress_easyvqa, mmpress_scenes, mmpress_jsonl_template
TASKS_DIR = Path(__file__).with_name("tasks")
MODEL_ID = "mmpress"
MODEL_CLASS = "mmpress.lmms.model.MMPress"


def manifest():
    """The ``lmms_eval.models`` entry point: the model's ``ModelManifest``; registers the task
    folder as a side effect (module docstring)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    register_tasks()
    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)


def register_tasks() -> bool:
    """Add :data:`TASKS_DIR` to the folders every lmms-eval ``TaskManager`` indexes (once; later
    calls do nothing). False, with a warning naming ``--include_path``, if this lmms-eval has no
    ``TaskManager.initialize_tasks`` to extend."""
    try:
        from lmms_eval.tasks import TaskManager
    except Exception as err:  # an lmms-eval whose task module does not import: the model still loads
        logging.getLogger(__name__).warning("mmpress tasks not registered (%s); pass --include_path %s", err, TASKS_DIR)
        return False
    original = getattr(TaskManager, "initialize_tasks", None)
    if original is None:
        logging.getLogger(__name__).warning("this lmms-eval has no TaskManager.initialize_tasks; pass --include_path %s",
                                            TASKS_DIR)
        return False
    if getattr(original, "_mmpress", False):
        return True

    def initialize_tasks(self, include_path=None, include_defaults=True):
        paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
        if not any(Path(p).resolve() == TASKS_DIR.resolve() for p in paths):
            paths.append(str(TASKS_DIR))
        return original(self, include_path=paths, include_defaults=include_defaults)

    initialize_tasks._mmpress = True
    initialize_tasks._original = original
    initialize_tasks.__doc__ = original.__doc__
    TaskManager.initialize_tasks = initialize_tasks
    return True
