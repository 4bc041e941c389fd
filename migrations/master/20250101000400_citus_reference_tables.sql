-- On Citus (schema-based sharding: each tenant schema lives on one worker), the shared lookup
-- tables become reference tables, copied to every worker, so that tenant tables can reference
-- them. The registry, public.tenants, stays on the coordinator. On PostgreSQL: nothing.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        PERFORM create_reference_table('public.focus_areas');
        PERFORM create_reference_table('public.coaching_categories');
    END IF;
END
$$;
