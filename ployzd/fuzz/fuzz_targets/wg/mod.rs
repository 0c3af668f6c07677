//! mesh's `wg::allowed` and `wg::uapi`, compiled in as they are.
#[allow(dead_code)]
#[path = "../../../../mesh/src/wg/allowed.rs"]
pub mod allowed;
#[allow(dead_code)]
#[path = "../../../../mesh/src/wg/uapi.rs"]
pub mod uapi;
