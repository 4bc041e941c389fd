-- Coaching chat history, with an embedding per message for semantic recall (pgvector, in public).
CREATE TABLE chat_messages (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id UUID NOT NULL,
    user_id UUID REFERENCES org_users (id) ON DELETE SET NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content TEXT NOT NULL,
    embedding vector(1536),
    token_count INTEGER CHECK (token_count >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX chat_messages_conversation_idx ON chat_messages (conversation_id, created_at);
CREATE INDEX chat_messages_user_idx ON chat_messages (user_id, created_at DESC);
CREATE INDEX chat_messages_embedding_idx ON chat_messages USING hnsw (embedding vector_cosine_ops);
