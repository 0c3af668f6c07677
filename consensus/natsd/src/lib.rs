//! NATS server IO (in progress).
