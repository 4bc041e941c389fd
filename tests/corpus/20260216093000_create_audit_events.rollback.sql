DROP TRIGGER programs_audit ON programs;
DROP TRIGGER members_audit ON members;
DROP FUNCTION record_audit_event();
DROP TABLE audit_events;
