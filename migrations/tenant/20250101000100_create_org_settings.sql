-- Per-organization settings as typed key/value pairs (branding, AI model, retention, ...).
CREATE TABLE org_settings (
    key TEXT PRIMARY KEY CHECK (key ~ '^[a-z][a-z0-9_.]*$'),
    value JSONB NOT NULL,
    updated_by UUID REFERENCES org_users (id) ON DELETE SET NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
