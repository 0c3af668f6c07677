//! The process-wide allocator of every program that links the runtime.
//!
//! libcontainer clones the calling process and runs Rust (which allocates) in
//! the child. Whatever lock another thread held at that instant stays locked
//! in the child forever. musl's allocator (mallocng) has one global lock, so a
//! clone racing any allocation on another thread deadlocks the child: seen
//! with the static (musl) build and parallel tests, the child stuck in
//! `__libc_malloc_impl` → `__lock`. mimalloc keeps a heap per thread, so the
//! child allocates from the cloning thread's own heap, which no other thread
//! touches. It is also much faster than musl's allocator for the daemon.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
