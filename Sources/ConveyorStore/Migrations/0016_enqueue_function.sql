-- Enqueue inside the application's own transaction (docs/enqueue.md): conveyor_enqueue(...)
-- writes a one-off task and its run handle in the caller's transaction, so the work exists if
-- and only if that transaction commits; the tasks trigger's NOTIFY reaches dispatchers at
-- commit. It validates as the API does (the same fields, the same rules, checked by a test that
-- feeds both the same bad inputs) and fails the caller's transaction with SQLSTATE 22023 and a
-- message that starts with the field ("name: ..."), also in the error's COLUMN field.
--
-- Least privilege: the function runs as its owner (SECURITY DEFINER); a caller needs EXECUTE on
-- it and a row in enqueue_grants for the namespace (both given by `conveyor enqueue-grant ROLE
-- --namespace NS`), and nothing on any table.
--
-- In Conveyor's own schema beside its tables, not a schema of its own: a schema named `conveyor`
-- is the `$user` schema of a role named conveyor (the usual name of Conveyor's database user),
-- first on its default search_path, so every later unqualified CREATE, the migrator's own
-- schema_migrations included, went there: a second copy of every table.

CREATE TABLE enqueue_grants (
    role       name NOT NULL,
    namespace  text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role, namespace)
);

CREATE FUNCTION conveyor_enqueue(
    name text,
    executor text,
    parameters jsonb DEFAULT '{}'::jsonb,
    queue text DEFAULT 'default',
    priority text DEFAULT 'normal',
    timeout double precision DEFAULT 300,
    schedule_to_start_timeout double precision DEFAULT 3600,
    max_attempts int DEFAULT 1,
    start timestamptz DEFAULT NULL,
    namespace text DEFAULT 'default'
) RETURNS TABLE (task_id uuid, run_id uuid)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp
AS $fn$
#variable_conflict use_variable
DECLARE
    v_id      uuid := gen_random_uuid();
    v_run     uuid := gen_random_uuid();
    v_prio    smallint;
    v_spec    jsonb;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM enqueue_grants g
                   WHERE g.namespace = conveyor_enqueue.namespace AND pg_has_role(session_user, g.role, 'MEMBER')) THEN
        RAISE EXCEPTION USING ERRCODE = '42501', COLUMN = 'namespace',
            MESSAGE = format('namespace: role %s may not enqueue into namespace %L', session_user, conveyor_enqueue.namespace),
            HINT = 'an owner of Conveyor''s database runs: conveyor enqueue-grant ROLE --namespace NAMESPACE';
    END IF;
    IF conveyor_enqueue.name IS NULL OR length(conveyor_enqueue.name) NOT BETWEEN 1 AND 200 OR conveyor_enqueue.name ~ '\s' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'name',
            MESSAGE = format('name: 1 to 200 characters, no spaces (got %s)', coalesce(quote_literal(conveyor_enqueue.name), 'null'));
    END IF;
    IF conveyor_enqueue.executor IS NULL OR conveyor_enqueue.executor !~ '^[A-Za-z0-9._-]{1,100}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'executor',
            MESSAGE = format('executor: name an executor that your workers offer, e.g. ''noop'' (letters, digits, ''-'', ''_'', ''.''; at most 100) (got %s)',
                             coalesce(quote_literal(conveyor_enqueue.executor), 'null'));
    END IF;
    IF conveyor_enqueue.parameters IS NULL OR jsonb_typeof(conveyor_enqueue.parameters) <> 'object' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'parameters',
            MESSAGE = format('parameters: a mapping, e.g. {"argv": ["/bin/echo", "hi"]} (got %s)', coalesce(conveyor_enqueue.parameters::text, 'null'));
    END IF;
    -- The API counts compact JSON; jsonb's text adds a space after each ':' and ','. Both are
    -- counted without those, as the encoded message carries them.
    IF octet_length(conveyor_enqueue.parameters::text) > 65536 + 2 * (SELECT count(*) FROM jsonb_path_query(conveyor_enqueue.parameters, 'strict $.**')) THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'parameters',
            MESSAGE = format('parameters: at most 65536 bytes of JSON travel in each task message; store large inputs elsewhere and pass a reference (got %s bytes)',
                             octet_length(conveyor_enqueue.parameters::text));
    END IF;
    IF conveyor_enqueue.queue IS NULL OR conveyor_enqueue.queue !~ '^[[:alnum:]_.-]+$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'queue',
            MESSAGE = format('queue: letters, digits, ''-'', ''_'' and ''.'' only (got %s)', coalesce(quote_literal(conveyor_enqueue.queue), 'null'));
    END IF;
    v_prio := CASE lower(conveyor_enqueue.priority) WHEN 'critical' THEN 0 WHEN 'high' THEN 1 WHEN 'normal' THEN 2
                                           WHEN 'low' THEN 3 WHEN 'background' THEN 4 END;
    IF v_prio IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'priority',
            MESSAGE = format('priority: one of critical, high, normal, low, background (got %s)', coalesce(quote_literal(conveyor_enqueue.priority), 'null'));
    END IF;
    IF conveyor_enqueue.timeout IS NULL OR NOT (conveyor_enqueue.timeout > 0) OR conveyor_enqueue.timeout = 'Infinity' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'timeout',
            MESSAGE = format('timeout: a positive number of seconds (got %s)', coalesce(conveyor_enqueue.timeout::text, 'null'));
    END IF;
    IF conveyor_enqueue.schedule_to_start_timeout IS NULL OR NOT (conveyor_enqueue.schedule_to_start_timeout > 0 AND conveyor_enqueue.schedule_to_start_timeout <= 604800) THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'schedule_to_start_timeout',
            MESSAGE = format('schedule_to_start_timeout: seconds a published run may wait for a worker to start it: above 0, at most 604800 (a week); default 3600 (got %s)',
                             coalesce(conveyor_enqueue.schedule_to_start_timeout::text, 'null'));
    END IF;
    IF conveyor_enqueue.max_attempts IS NULL OR conveyor_enqueue.max_attempts NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'retry.max_attempts',
            MESSAGE = format('retry.max_attempts: a whole number from 1 (no retries) to 1000 (got %s)', coalesce(conveyor_enqueue.max_attempts::text, 'null'));
    END IF;
    -- The definition as TaskSpec.encode writes it, so PATCH and the API read it as any task's.
    v_spec := jsonb_build_object(
        'name', conveyor_enqueue.name, 'executor', conveyor_enqueue.executor, 'parameters', conveyor_enqueue.parameters, 'schedule', 'once',
        'timezone', 'UTC', 'misfire', 'once', 'max_catchup', 10, 'queue', conveyor_enqueue.queue,
        'priority', CASE v_prio WHEN 0 THEN 'critical' WHEN 1 THEN 'high' WHEN 2 THEN 'normal' WHEN 3 THEN 'low' ELSE 'background' END,
        'timeout', conveyor_enqueue.timeout, 'schedule_to_start_timeout', conveyor_enqueue.schedule_to_start_timeout,
        'overlap', 'allow', 'trigger_rule', 'all_success', 'labels', '{}'::jsonb,
        'retry', jsonb_build_object('max_attempts', conveyor_enqueue.max_attempts, 'base_seconds', 1, 'factor', 2,
                                    'cap_seconds', 300, 'jitter', true, 'retry_on', '[]'::jsonb, 'no_retry_on', '[]'::jsonb));
    BEGIN
        INSERT INTO tasks (id, namespace, name, executor, parameters, schedule, queue, timeout_seconds, next_run_at,
                           anchor_at, shard, priority, max_attempts, retry_policy, spec, schedule_to_start_seconds,
                           next_run_id)
        VALUES (v_id, conveyor_enqueue.namespace, conveyor_enqueue.name, conveyor_enqueue.executor, conveyor_enqueue.parameters, 'once', conveyor_enqueue.queue,
                conveyor_enqueue.timeout, coalesce(conveyor_enqueue.start, now()), coalesce(conveyor_enqueue.start, now()),
                hashtext(v_id::text) & 2147483647, v_prio, conveyor_enqueue.max_attempts, (v_spec->'retry') - 'max_attempts',
                v_spec, conveyor_enqueue.schedule_to_start_timeout, v_run);
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION USING ERRCODE = '23505', COLUMN = 'name',
            MESSAGE = format('name: a task named %L exists in namespace %L; pick another name', conveyor_enqueue.name, conveyor_enqueue.namespace);
    END;
    task_id := v_id;
    run_id := v_run;
    RETURN NEXT;
END
$fn$;
REVOKE ALL ON FUNCTION conveyor_enqueue(text, text, jsonb, text, text, double precision, double precision, int,
                                        timestamptz, text) FROM PUBLIC;

-- What `conveyor enqueue-grant` runs, as the owner: a role may enqueue into a namespace.
CREATE FUNCTION conveyor_grant_enqueue(grantee name, ns text) RETURNS void
LANGUAGE plpgsql SET search_path = public, pg_temp
AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = grantee) THEN
        RAISE EXCEPTION USING ERRCODE = '42704', COLUMN = 'role',
            MESSAGE = format('role: no role named %I; a database administrator creates it first (CREATE ROLE %I LOGIN PASSWORD ...)', grantee, grantee);
    END IF;
    IF ns IS NULL OR length(ns) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'namespace', MESSAGE = 'namespace: 1 to 200 characters';
    END IF;
    EXECUTE format('GRANT EXECUTE ON FUNCTION conveyor_enqueue(text, text, jsonb, text, text, double precision, '
                   'double precision, int, timestamptz, text) TO %I', grantee);
    INSERT INTO enqueue_grants (role, namespace) VALUES (grantee, ns) ON CONFLICT DO NOTHING;
END
$fn$;

-- And its undoing: the namespace's grant goes; with the role's last one, its privileges.
CREATE FUNCTION conveyor_revoke_enqueue(grantee name, ns text) RETURNS void
LANGUAGE plpgsql SET search_path = public, pg_temp
AS $fn$
BEGIN
    DELETE FROM enqueue_grants WHERE role = grantee AND namespace = ns;
    IF NOT EXISTS (SELECT 1 FROM enqueue_grants WHERE role = grantee)
       AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = grantee) THEN
        EXECUTE format('REVOKE EXECUTE ON FUNCTION conveyor_enqueue(text, text, jsonb, text, text, double precision, '
                       'double precision, int, timestamptz, text) FROM %I', grantee);
    END IF;
END
$fn$;
REVOKE ALL ON FUNCTION conveyor_grant_enqueue(name, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION conveyor_revoke_enqueue(name, text) FROM PUBLIC;
