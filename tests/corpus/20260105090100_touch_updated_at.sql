-- updated_at stays true whatever the application sends. The function calls built-ins only, so
-- its search path is pinned to the catalog.
CREATE FUNCTION touch_updated_at() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER members_touch BEFORE UPDATE ON members
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
