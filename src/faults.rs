//! Fault-injection points for the hand-over tests: with `FERRY_HOLD_AT=NAME` in its
//! environment, a ferry process stops at the point called NAME (and says so on stderr) until it
//! is killed, so that a test can kill it, or anything else, at exactly that phase;
//! `FERRY_HOLD_AT=NAME:SECS` holds for SECS seconds and then goes on, so that a test can break
//! something else meanwhile. Without the variable a point costs one environment lookup.

use std::time::Duration;

/// Holds here if `FERRY_HOLD_AT` names this point.
pub async fn hold(point: &str) {
    let Some(spec) = std::env::var_os("FERRY_HOLD_AT") else {
        return;
    };
    let spec = spec.to_string_lossy();
    let (name, secs) = match spec.split_once(':') {
        Some((name, secs)) => (name, secs.parse::<u64>().ok()),
        None => (spec.as_ref(), None),
    };
    if name != point {
        return;
    }
    eprintln!("ferry: holding at {point} (FERRY_HOLD_AT)");
    match secs {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => std::future::pending::<()>().await,
    }
}
