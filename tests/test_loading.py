"""Migration files are parsed once and kept while they stay as they are, never once they change."""

import os
import time

from yoyo_tenants import migrate_master, provision_tenant
from yoyo_tenants.loading import load_migrations

from .conftest import columns, write_migration

ADD = "20300101000000_add_nickname"
HOUR_AGO = time.time() - 3600


def age(directory):
    """Make every file in `directory` look an hour old: old enough to be kept."""
    for path in directory.iterdir():
        os.utime(path, (HOUR_AGO, HOUR_AGO))


def test_unchanged_files_are_parsed_once(project):
    age(project.tenant_dir)
    assert load_migrations(project.tenant_dir) is load_migrations(project.tenant_dir)


def test_files_written_a_moment_ago_are_read_again(project):
    # Within the file system's clock tick a rewrite can keep its time stamp: never trusted.
    assert load_migrations(project.tenant_dir) is not load_migrations(project.tenant_dir)


def test_a_migration_edited_after_loading_is_what_the_next_org_gets(project, database):
    migrate_master(project)
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;")
    age(project.tenant_dir)
    first = provision_tenant(project, "org_early1").tenant.schema
    assert "nickname" in columns(database, first, "org_users")

    # Same size, new text: only the time stamp tells them apart. (An edit the first org has not
    # got is drift: provisioning is told to go on anyway.)
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nicknam2 TEXT;")
    second = provision_tenant(project, "org_later1", allow_drift=True).tenant.schema
    assert "nicknam2" in columns(database, second, "org_users")
    assert "nickname" not in columns(database, second, "org_users")


def test_a_new_migration_file_is_picked_up(project, database):
    migrate_master(project)
    age(project.tenant_dir)
    provision_tenant(project, "org_early1")
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;")
    later = provision_tenant(project, "org_later1")
    assert later.migrations[-1] == ADD
    assert "nickname" in columns(database, later.tenant.schema, "org_users")


def test_an_edit_that_keeps_the_files_time_stamp_is_picked_up_by_its_size(project, database):
    # A copy that keeps time stamps (cp -p, rsync -t, an unpacked archive) can bring new text
    # under the old time: the size still tells.
    migrate_master(project)
    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname TEXT;")
    age(project.tenant_dir)
    first = provision_tenant(project, "org_early1").tenant.schema
    assert "nickname" in columns(database, first, "org_users")

    write_migration(project.tenant_dir, ADD, "ALTER TABLE org_users ADD COLUMN nickname_2 TEXT;")
    age(project.tenant_dir)
    second = provision_tenant(project, "org_later1", allow_drift=True).tenant.schema

    assert "nickname_2" in columns(database, second, "org_users")
    assert "nickname" not in columns(database, second, "org_users")
