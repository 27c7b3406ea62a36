//! Store helpers shared by the store test suites.

use connect_warden::store::{Commit, CommitOutcome, Installation, InstallationStore, SeenToken};

/// One compare-and-set write; panics on a store error.
pub async fn commit(
    store: &dyn InstallationStore,
    record: &Installation,
    expected_version: u64,
    token: Option<SeenToken>,
) -> CommitOutcome {
    store
        .commit(Commit {
            record,
            expected_version,
            token,
        })
        .await
        .expect("commit")
}
