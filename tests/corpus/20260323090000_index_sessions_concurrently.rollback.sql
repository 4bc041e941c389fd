-- transactional: false
DROP INDEX CONCURRENTLY audit_events_row_idx;
DROP INDEX CONCURRENTLY coaching_sessions_program_idx;
