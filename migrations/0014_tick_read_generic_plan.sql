-- vibe_tick_read's page read (RETURN QUERY over vibe_read, inlined) binds the cursor and the
-- page size as parameters. PL/pgSQL caches its plan, but with the default plan_cache_mode the
-- generic plan's estimate for an unknown cursor looks worse than the custom plans', so every
-- call planned the read afresh: 0.72 ms a call against 0.26 ms with the generic plan (pgbench,
-- one client, a cursor three ticks back), about 0.45 ms of database CPU per tick. The generic
-- plan is the custom one: index scans from the cursor's tick, whatever its value.
ALTER FUNCTION vibe_tick_read(bigint, text, text, bigint, bigint, bigint)
    SET plan_cache_mode = force_generic_plan;
