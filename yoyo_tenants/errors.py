"""The errors a user can act on.

Library code raises these; only the task layer turns them into one line on stderr and an exit code.
"""


class TenantsError(Exception):
    """Base of every error yoyo-tenants reports to a user."""

    exit_code = 1


class UsageError(TenantsError):
    """The command line or an argument is wrong (bad org id, bad migration name, ...)."""

    exit_code = 2


class ConfigError(TenantsError):
    """A DB_* setting or DATABASE_URL is wrong or incomplete."""

    exit_code = 2


class ConnectionFailed(TenantsError):
    """The database could not be reached or refused us."""


class NotReady(TenantsError):
    """The database lacks something a command needs (master migrations, an extension)."""


class UnknownTenant(TenantsError):
    """No tenant is registered for that org id."""


class SchemaCollision(TenantsError):
    """Two org ids hash to the same tenant schema name."""


class MigrationFailed(TenantsError):
    """A migration's SQL failed; its schema's transaction was rolled back."""

    def __init__(self, migration_id: str, schema: str, error: str):
        self.migration_id = migration_id
        self.schema = schema
        self.error = error
        super().__init__(f"migration {migration_id} failed in schema {schema}: {error}")


class MigrationsMissing(TenantsError):
    """A schema has applied migrations whose files no longer exist."""


class LockBusy(TenantsError):
    """Another run held a schema's lock for longer than we were willing to wait."""
