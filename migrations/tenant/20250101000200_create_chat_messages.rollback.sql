DROP INDEX chat_messages_embedding_idx;
DROP INDEX chat_messages_user_idx;
DROP INDEX chat_messages_conversation_idx;
DROP TABLE chat_messages;
