-- A node about to drop an unused managed index claims its row first (`dropping`), so another
-- node pruning at the same time, or an approval of the same index, cannot act on it meanwhile:
-- approval takes only `failed` and `dropped` rows, and the prune only `ready` ones.
ALTER TABLE managed_indexes DROP CONSTRAINT managed_indexes_status_check;
ALTER TABLE managed_indexes ADD CONSTRAINT managed_indexes_status_check
    CHECK (status IN ('building', 'ready', 'failed', 'dropping', 'dropped'));
