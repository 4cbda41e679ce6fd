-- conveyor_enqueue refuses a timeout the API refuses (docs/enqueue.md): more than 365 days
-- (TaskMessage.maxTimeoutSeconds; 0.10.0 bounded the API, the messages and the dispatcher, and
-- the function was left accepting them), and NaN, which passed `timeout > 0`. Such a task's run
-- was refused by every worker instead of failing the caller's INSERT with the field named. It
-- also refuses a `start` before year 1 or past 9999 (BC, infinity), which the API refuses.
-- CREATE OR REPLACE keeps the function's owner, SECURITY DEFINER and the EXECUTE grants.

CREATE OR REPLACE FUNCTION conveyor_enqueue(
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
    -- NaN is greater than every number in PostgreSQL, so the upper bound refuses it too.
    IF conveyor_enqueue.timeout IS NULL OR NOT (conveyor_enqueue.timeout > 0 AND conveyor_enqueue.timeout <= 31536000) THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'timeout',
            MESSAGE = format('timeout: a positive number of seconds, at most 31536000 (365 days) (got %s)', coalesce(conveyor_enqueue.timeout::text, 'null'));
    END IF;
    -- As the API reads instants: from year 1 to 9999 (a BC or infinite start sorted first among
    -- due tasks, and the dispatcher could not read it back).
    IF conveyor_enqueue.start IS NOT NULL AND NOT (conveyor_enqueue.start >= '0001-01-01T00:00:00Z'
                                                   AND conveyor_enqueue.start < '10000-01-01T00:00:00Z') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', COLUMN = 'start',
            MESSAGE = format('start: an instant from 0001-01-01 to 9999-12-31 UTC (got %s)', conveyor_enqueue.start);
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
