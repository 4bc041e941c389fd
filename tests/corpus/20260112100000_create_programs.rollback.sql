DROP TABLE programs;
DROP TYPE program_status;
