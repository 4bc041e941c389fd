"""Schema-per-tenant PostgreSQL migrations on yoyo-migrations.

The commands are plain functions (see `yoyo_tenants.commands`); the invoke tasks are a thin layer
over them.
"""

from .commands import (
    DEFAULT_JOBS,
    make_migration,
    migrate_master,
    migrate_tenants,
    rollback_master,
    rollback_tenants,
    status,
    verify,
)
from .errors import TenantsError
from .provisioning import deprovision_tenant, provision_tenant
from .registry import schema_for
from .settings import Settings

__all__ = [
    "DEFAULT_JOBS",
    "Settings",
    "TenantsError",
    "deprovision_tenant",
    "make_migration",
    "migrate_master",
    "migrate_tenants",
    "provision_tenant",
    "rollback_master",
    "rollback_tenants",
    "schema_for",
    "status",
    "verify",
]
