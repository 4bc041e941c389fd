-- The sessions of a program, with an embedding of the coach's notes for search (pgvector's
-- vector type, installed in public by the master migrations).
CREATE TYPE session_status AS ENUM ('planned', 'held', 'cancelled');

CREATE TABLE coaching_sessions (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    program_id BIGINT NOT NULL REFERENCES programs (id) ON DELETE CASCADE,
    coachee_id BIGINT REFERENCES members (id) ON DELETE SET NULL,
    status session_status NOT NULL DEFAULT 'planned',
    starts_at TIMESTAMPTZ NOT NULL,
    notes TEXT,
    notes_embedding vector(384),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every table of this schema with an updated_at gets the touch trigger, unless it has it. Looked
-- up in this schema only: every other tenant has tables of the same names.
DO $$
DECLARE
    target record;
BEGIN
    FOR target IN
        SELECT c.oid, c.relname
        FROM pg_class c
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'updated_at' AND NOT a.attisdropped
        WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
          AND c.relkind = 'r'
          AND NOT EXISTS (
              SELECT FROM pg_trigger t
              WHERE t.tgrelid = c.oid AND t.tgfoid = 'touch_updated_at'::regproc
          )
        ORDER BY c.relname
    LOOP
        EXECUTE format(
            'CREATE TRIGGER %I BEFORE UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION touch_updated_at()',
            target.relname || '_touch',
            target.oid::regclass
        );
    END LOOP;
END
$$;
