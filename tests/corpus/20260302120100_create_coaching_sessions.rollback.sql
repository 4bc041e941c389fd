DROP TABLE coaching_sessions;
DROP TYPE session_status;
