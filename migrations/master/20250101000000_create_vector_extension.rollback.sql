-- Fails (as it should) while any tenant table still has a vector column.
DROP EXTENSION IF EXISTS vector;
