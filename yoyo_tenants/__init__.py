"""Schema-per-tenant PostgreSQL migrations on yoyo-migrations.

The commands are plain functions (see `yoyo_tenants.commands`); the invoke tasks are a thin layer
over them.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

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

try:
    # The version lives in pyproject.toml only; this is what was installed from it.
    __version__ = _version("yoyo-tenants")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"

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
