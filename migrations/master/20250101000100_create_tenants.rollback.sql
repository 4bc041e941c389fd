DROP TABLE public.tenants;
