-- Coaching programs. Their labels are a comma-separated list for now.
CREATE TYPE program_status AS ENUM ('draft', 'active', 'archived');

CREATE TABLE programs (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title TEXT NOT NULL,
    coach_id BIGINT REFERENCES members (id) ON DELETE SET NULL,
    status program_status NOT NULL DEFAULT 'draft',
    starts_on DATE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    labels TEXT NOT NULL DEFAULT ''
);

CREATE INDEX programs_coach_idx ON programs (coach_id);

CREATE TRIGGER programs_touch BEFORE UPDATE ON programs
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
