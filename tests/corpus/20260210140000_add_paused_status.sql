-- A program can be paused (its coach is away) without being archived.
ALTER TYPE program_status ADD VALUE 'paused' AFTER 'active';
