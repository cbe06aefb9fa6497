//! A timer branch for `select!` loops that may have no deadline.

/// Sleeps until `deadline`, or forever without one: a timer branch of a
/// `select!` that is switched off by passing `None`.
pub(crate) async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
