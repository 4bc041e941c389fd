-- pgvector, installed once in public so that every tenant schema can use the vector type.
-- Only when it is not there: where a superuser installed it already (a managed server, Citus,
-- whose CREATE EXTENSION IF NOT EXISTS re-registers it on every worker as its owner only may),
-- there is nothing to do. Where it is missing and this user may not create it, the error says
-- what a superuser must run.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'vector') THEN
        CREATE EXTENSION vector WITH SCHEMA public;
    END IF;
END
$$;
