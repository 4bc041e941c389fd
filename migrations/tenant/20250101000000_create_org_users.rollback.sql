DROP INDEX org_users_email_idx;
DROP TABLE org_users;
