"""invoke's entry point: the tasks live in the package (yoyo_tenants/tasks.py)."""

from yoyo_tenants.tasks import ns  # noqa: F401
