-- PostgreSQL cannot drop a value from an enum: the type is made again without it, and so is
-- the view that reads the column.
UPDATE programs SET status = 'active' WHERE status = 'paused';
DROP VIEW active_programs;

ALTER TYPE program_status RENAME TO program_status_old;
CREATE TYPE program_status AS ENUM ('draft', 'active', 'archived');
ALTER TABLE programs
    ALTER COLUMN status DROP DEFAULT,
    ALTER COLUMN status TYPE program_status USING status::text::program_status,
    ALTER COLUMN status SET DEFAULT 'draft';
DROP TYPE program_status_old;

CREATE VIEW active_programs AS
SELECT p.id, p.title, p.starts_on, m.display_name AS coach
FROM programs p
LEFT JOIN members m ON m.id = p.coach_id
WHERE p.status = 'active';
