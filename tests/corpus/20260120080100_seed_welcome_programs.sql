-- Every new organization starts with two sample programs.
COPY programs (title, status, starts_on, created_at, updated_at, labels) FROM stdin;
Welcome to coaching	active	2026-02-02	2026-01-20 08:01:00+00	2026-01-20 08:01:00+00	feedback,wellbeing
First-time managers	draft	\N	2026-01-20 08:01:00+00	2026-01-20 08:01:00+00	growth,leadership,new-managers
\.
