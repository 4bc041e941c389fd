"""Arbitrary strings at every input: each is accepted as valid or refused with a clear error,
and a refusal leaves every schema and the registry exactly as they were."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from yoyo_tenants import make_migration, migrate_master, migrate_tenants, provision_tenant
from yoyo_tenants.errors import ConfigError, TenantsError, UnknownTenant, UsageError
from yoyo_tenants.registry import ORG_ID
from yoyo_tenants.settings import VARIABLES, connection_params, describe

from .conftest import on_a_database, query

HOSTILE = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "",
            "org_",
            "org_a'; DROP TABLE public.tenants; --",
            'org_"x"',
            "org_abc\x00def",
            "org_ábc",
            "org_abc\n",
            "ORG_abc",
            "org_" + "a" * 10_000,
            "tid_cf4116b064",
            "../../etc/passwd",
            "add_column; rm -rf /",
            "$(touch /tmp/pwned)",
        ]
    ),
    st.text(alphabet="org_abcXYZ019;'\"\\ -\x00", max_size=40).map(lambda s: "org_" + s),
)
FAST = on_a_database(60)


def snapshot(params):
    return (
        query(params, "SELECT nspname FROM pg_namespace ORDER BY 1"),
        query(params, "SELECT clerk_org_id, schema_name FROM public.tenants ORDER BY 1"),
        query(
            params,
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
        ),
    )


@pytest.fixture
def migrated(project):
    migrate_master(project)
    provision_tenant(project, "org_existing1")
    return project


@FAST
@given(org_id=HOSTILE)
def test_org_ids_are_provisioned_or_refused_cleanly(migrated, database, org_id):
    before = snapshot(database)
    try:
        result = provision_tenant(migrated, org_id)
    except UsageError as exc:
        assert "invalid org id" in str(exc) and "\n" not in str(exc)
        assert len(str(exc)) < 300
        assert snapshot(database) == before
    else:
        assert ORG_ID.fullmatch(org_id) and len(org_id) <= 64
        assert result.tenant.org_id == org_id


@FAST
@given(org_id=HOSTILE)
def test_tenant_flag_is_found_or_refused_cleanly(migrated, database, org_id):
    before = snapshot(database)
    with pytest.raises((UsageError, UnknownTenant)) as refused:
        migrate_tenants(migrated, tenant=org_id)
    assert "\n" not in str(refused.value)
    assert snapshot(database) == before


@FAST
@given(name=HOSTILE)
def test_migration_names_make_a_file_or_are_refused(migrated, name):
    before = sorted(p.name for p in migrated.tenant_dir.iterdir())
    try:
        paths = make_migration(migrated, "tenant", name)
    except UsageError as exc:
        assert "invalid migration name" in str(exc)
        assert sorted(p.name for p in migrated.tenant_dir.iterdir()) == before
    else:
        assert all(p.parent == migrated.tenant_dir for p in paths)
        for path in paths:
            path.unlink()


@FAST
@given(
    name=st.sampled_from([v for v in VARIABLES if v != "DATABASE_URL"]),
    value=HOSTILE,
)
def test_db_settings_are_mapped_or_refused(name, value):
    env = {"DB_HOST": "db.example.com", "DB_PASSWORD": "s3cret-Pa55", name: value}
    try:
        params = connection_params(env)
    except ConfigError as exc:
        assert name in str(exc) and "s3cret-Pa55" not in str(exc)
    else:
        assert "s3cret-Pa55" not in describe(params)


@FAST
@given(value=HOSTILE)
def test_database_url_is_mapped_or_refused_without_echoing_it(value):
    url = f"postgresql://app:s3cret-Pa55@localhost/{value}"
    try:
        connection_params({"DATABASE_URL": url})
    except ConfigError as exc:
        assert "s3cret-Pa55" not in str(exc)


@FAST
@given(value=HOSTILE)
def test_hostile_settings_against_the_real_server_fail_cleanly(server, value):
    env = {
        "DB_HOST": server["host"],
        "DB_PORT": server["port"],
        "DB_USER": value,
        "DB_NAME": value,
        "DB_PASSWORD": "s3cret-Pa55",
    }
    try:
        params = connection_params(env)
        from yoyo_tenants.db import connect

        connect(params).close()
    except TenantsError as exc:
        assert "s3cret-Pa55" not in str(exc) and "\n" not in str(exc)


def test_a_name_the_server_cuts_mid_character_fails_cleanly(server):
    value = "0" * 18 + "\x80" * 9 + "\U00010000" * 7  # found by hypothesis
    env = {"DB_HOST": server["host"], "DB_PORT": server["port"], "DB_USER": value}
    from yoyo_tenants.db import connect

    with pytest.raises(TenantsError) as refused:
        connect(connection_params(env))
    assert "\n" not in str(refused.value)
