DROP VIEW active_programs;
