DROP TABLE members;
DROP TYPE member_role;
