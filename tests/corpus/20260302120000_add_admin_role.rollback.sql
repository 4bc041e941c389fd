-- PostgreSQL cannot drop a value from an enum: the type is made again without it.
UPDATE members SET role = 'member' WHERE role = 'admin';

ALTER TYPE member_role RENAME TO member_role_old;
CREATE TYPE member_role AS ENUM ('owner', 'coach', 'member');
ALTER TABLE members
    ALTER COLUMN role DROP DEFAULT,
    ALTER COLUMN role TYPE member_role USING role::text::member_role,
    ALTER COLUMN role SET DEFAULT 'member';
DROP TYPE member_role_old;
