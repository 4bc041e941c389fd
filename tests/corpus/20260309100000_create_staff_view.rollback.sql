DROP VIEW staff;
