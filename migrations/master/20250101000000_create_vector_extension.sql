-- pgvector, installed once in public so that every tenant schema can use the vector type.
CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;
