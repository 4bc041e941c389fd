DROP TRIGGER programs_refuse_archiving ON programs;
DROP FUNCTION refuse_archiving_busy_program();
