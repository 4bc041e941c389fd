-- Tags programs are filed under, and the ones every organization starts with (the data section
-- as pg_dump writes it: tab-separated, \N for null, backslash escapes, ended by \.).
CREATE TABLE tags (
    slug TEXT PRIMARY KEY CHECK (slug ~ '^[a-z0-9-]+$'),
    label TEXT NOT NULL,
    description TEXT
);

COPY tags (slug, label, description) FROM stdin;
leadership	Leadership	Leading a team, and oneself
wellbeing	Bien-être	Sommeil, énergie, équilibre
feedback	Feedback	\N
growth	成長	Learning goals, in the coachee's own words
tools	Tools	Notes live in C:\\Coaching\\Notes on Windows laptops
agenda	Agenda	First line\nSecond line\tindented
\.
