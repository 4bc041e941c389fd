-- The tenant registry: one row per organization, naming its schema.
CREATE TABLE public.tenants (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    clerk_org_id TEXT NOT NULL UNIQUE CHECK (clerk_org_id ~ '^org_[A-Za-z0-9]+$'),
    schema_name TEXT NOT NULL UNIQUE CHECK (schema_name ~ '^tid_[0-9a-f]{10}$'),
    status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
