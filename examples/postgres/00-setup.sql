-- Step 0, in PostgreSQL (14 or later), once, as a superuser or the database
-- owner, before the manifests are applied:
--
--   psql "host=postgres.databases.svc.cluster.local dbname=billing user=postgres" -f 00-setup.sql
--
-- It creates the two things keysmith needs from the database side: the admin
-- role keysmith acts as, and a role holding the privileges that integrations
-- may be granted. keysmith creates everything else itself.

-- 1. The admin role. Not a superuser, owns no data:
--    - CREATEROLE, to create, alter, comment on and drop the roles it
--      manages, and to grant them memberships;
--    - pg_signal_backend, to end the open sessions of a key it revokes
--      (refusing new logins alone would leave those sessions running).
--    Its password goes into the Secret of 02-admin-credentials.yaml: pick
--    your own, and keep the two in step.
CREATE ROLE keysmith_admin LOGIN CREATEROLE PASSWORD 'change-me';
GRANT pg_signal_backend TO keysmith_admin;

-- 2. A role that integrations may be granted (RoleBinding roles name it).
--    Privileges belong on roles like this one, managed by whoever owns the
--    data; keysmith only grants and revokes membership in them.
CREATE ROLE invoices_reader NOLOGIN;
GRANT CONNECT ON DATABASE billing TO invoices_reader;
GRANT USAGE ON SCHEMA public TO invoices_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO invoices_reader;
-- Tables created later by the role running this script are readable too.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO invoices_reader;

-- On PostgreSQL 16 and later a CREATEROLE role may only grant roles it has
-- ADMIN OPTION on; give it that, without the role's privileges:
--   GRANT invoices_reader TO keysmith_admin WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;

-- 3. pg_hba.conf must let the integration's keys log in with a password from
--    the pods that use them. Each key is its own LOGIN role named
--    <account>_k_<key id>, a member of the account's role, so one line
--    covers every key of an account, present and future:
--   host  billing  +billing-sync  10.0.0.0/8  scram-sha-256
