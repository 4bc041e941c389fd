-- A program with sessions still planned cannot be archived.
CREATE FUNCTION refuse_archiving_busy_program() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
BEGIN
    IF NEW.status = 'archived' AND EXISTS (
        SELECT FROM coaching_sessions WHERE program_id = NEW.id AND status = 'planned'
    ) THEN
        RAISE EXCEPTION 'program % has sessions planned', NEW.id
            USING ERRCODE = 'check_violation', HINT = 'Cancel or hold them first.';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER programs_refuse_archiving BEFORE UPDATE OF status ON programs
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status)
    EXECUTE FUNCTION refuse_archiving_busy_program();
