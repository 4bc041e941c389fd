DROP TABLE public.focus_areas;
