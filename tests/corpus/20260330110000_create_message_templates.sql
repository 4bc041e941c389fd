-- What members are sent, per locale and optionally per role; {name} is filled in when sent.
CREATE TABLE message_templates (
    key TEXT NOT NULL,
    locale TEXT NOT NULL,
    role member_role,
    body TEXT NOT NULL,
    PRIMARY KEY (key, locale)
);

COPY message_templates (key, locale, role, body) FROM stdin;
welcome	en	\N	Welcome, {name}!\nYour coach will be in touch.
welcome	de	\N	Willkommen, {name}! Dein Coach meldet sich in Kürze.
welcome	ja	\N	ようこそ、{name}さん。
admin_intro	en	admin	As an admin you manage members and billing, not sessions.
reminder	fr	member	Rappel : séance demain à 9 h — notes dans « C:\\Séances »
\.
