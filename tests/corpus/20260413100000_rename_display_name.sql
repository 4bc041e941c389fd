-- "Display name" was never what members typed: it is their full name. The views follow.
ALTER TABLE members RENAME COLUMN display_name TO full_name;
