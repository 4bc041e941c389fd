-- transactional: false
-- Built without blocking writes: these tables are busy by now.
CREATE INDEX CONCURRENTLY coaching_sessions_program_idx ON coaching_sessions (program_id, starts_at);
CREATE INDEX CONCURRENTLY audit_events_row_idx ON audit_events (table_name, row_id);
