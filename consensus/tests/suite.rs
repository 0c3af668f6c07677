//! openraft's storage conformance suite against our store (segment-file log, in-memory state).

use openraft::testing::StoreBuilder;
use openraft::testing::Suite;
use openraft::StorageError;
use openraft::StorageIOError;
use ployz_consensus::store;
use ployz_consensus::LogStore;
use ployz_consensus::NodeId;
use ployz_consensus::StateMachineStore;
use ployz_consensus::TypeConfig;
use tempfile::TempDir;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = TempDir::new().map_err(|e| StorageIOError::write(&e))?;
        let (log, sm) = store::open(dir.path()).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(SledBuilder) {
        panic!("storage suite failed: {e}");
    }
}
