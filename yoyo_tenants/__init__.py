"""Schema-per-tenant PostgreSQL migrations on yoyo-migrations.

The commands are plain functions (see `yoyo_tenants.commands`); the invoke tasks are a thin layer
over them.
"""

from .commands import (
    DEFAULT_JOBS,
    make_migration,
    migrate_master,
    migrate_tenants,
    repair,
    rollback_master,
    rollback_tenants,
)
from .errors import TenantsError
from .inspection import status, verify
from .provisioning import deprovision_tenant, provision_tenant, restore_tenant
from .registry import schema_for
from .settings import Settings


def __getattr__(name: str) -> str:
    """`__version__`, read when asked for: importlib.metadata costs every command's start-up
    more than some commands take."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        # The version lives in pyproject.toml only; this is what was installed from it.
        return version("yoyo-tenants")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown"


__all__ = [
    "DEFAULT_JOBS",
    "Settings",
    "TenantsError",
    "deprovision_tenant",
    "make_migration",
    "migrate_master",
    "migrate_tenants",
    "provision_tenant",
    "repair",
    "restore_tenant",
    "rollback_master",
    "rollback_tenants",
    "schema_for",
    "status",
    "verify",
]
