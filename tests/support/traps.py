"""Objects a spec role that owns a database can create to catch a superuser session: each
records `current_user` in `public.trap_hits` when it runs with superuser rights (or as another
role than the session's). Used by tests/integration/test_security_net.py and
tests/fault/test_fault_sessions.py.
"""

TRAPS = """
CREATE TABLE public.trap_hits (who name, what text);
GRANT INSERT ON public.trap_hits TO PUBLIC;
CREATE FUNCTION public.hit(what text) RETURNS boolean LANGUAGE sql
  AS $$ INSERT INTO public.trap_hits SELECT current_user, what
         WHERE current_user OPERATOR(pg_catalog.<>) session_user
            OR (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) current_user);
        SELECT true $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql
  AS $$ SELECT public.hit('now()'); SELECT pg_catalog.now() $$;
CREATE FUNCTION public.pg_backend_pid() RETURNS int LANGUAGE sql
  AS $$ SELECT public.hit('pg_backend_pid()'); SELECT pg_catalog.pg_backend_pid() $$;
CREATE FUNCTION public.current_setting(text) RETURNS text LANGUAGE sql
  AS $$ SELECT public.hit('current_setting()'); SELECT pg_catalog.current_setting($1) $$;
CREATE FUNCTION public.pg_reload_conf() RETURNS boolean LANGUAGE sql
  AS $$ SELECT public.hit('pg_reload_conf()'); SELECT pg_catalog.pg_reload_conf() $$;
CREATE FUNCTION public.eq_text(text, text) RETURNS boolean LANGUAGE sql
  AS $$ SELECT public.hit('text = text'); SELECT $1 OPERATOR(pg_catalog.=) $2 $$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.eq_text);
CREATE FUNCTION public.ne_text(text, text) RETURNS boolean LANGUAGE sql
  AS $$ SELECT public.hit('text <> text'); SELECT $1 OPERATOR(pg_catalog.<>) $2 $$;
CREATE OPERATOR public.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = public.ne_text);
CREATE FUNCTION public.eq_name(name, name) RETURNS boolean LANGUAGE sql
  AS $$ SELECT public.hit('name = name'); SELECT $1 OPERATOR(pg_catalog.=) $2 $$;
CREATE OPERATOR public.= (LEFTARG = name, RIGHTARG = name, FUNCTION = public.eq_name);
CREATE FUNCTION public.eq_oid(oid, oid) RETURNS boolean LANGUAGE sql
  AS $$ SELECT public.hit('oid = oid'); SELECT $1 OPERATOR(pg_catalog.=) $2 $$;
CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = public.eq_oid);
CREATE VIEW public.pg_stat_activity AS
  SELECT a.*, public.hit('view pg_stat_activity') AS trap FROM pg_catalog.pg_stat_activity a;
CREATE VIEW public.pg_roles AS
  SELECT r.*, public.hit('view pg_roles') AS trap FROM pg_catalog.pg_roles r;
CREATE VIEW public.pg_settings AS
  SELECT s.*, public.hit('view pg_settings') AS trap FROM pg_catalog.pg_settings s;
CREATE TABLE public.health_check (id serial primary key, updated_at timestamptz default pg_catalog.now());
GRANT ALL ON public.health_check TO PUBLIC;
CREATE FUNCTION public.health_trigger() RETURNS trigger LANGUAGE plpgsql
  AS $$ BEGIN PERFORM public.hit('trigger on health_check'); RETURN NEW; END $$;
CREATE TRIGGER trap BEFORE INSERT OR UPDATE ON public.health_check
  FOR EACH ROW EXECUTE FUNCTION public.health_trigger();
"""
