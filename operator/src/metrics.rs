//! The operator's Prometheus metrics: reconciles by controller and result,
//! failures by error category, reconcile duration, whether this replica
//! leads.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::context::Error;

/// Labels of a reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `topic` or `subscription`.
    pub controller: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of a failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `topic` or `subscription`.
    pub controller: &'static str,
    /// The error's category (`BrokerUnavailable`, `KubeApi`, ...).
    pub category: &'static str,
}

/// Every metric of the operator.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Histogram,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferry_operator");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register("reconciles", "Reconciles by controller and result", reconciles.clone());
        registry.register("reconcile_failures", "Failed reconciles by controller and error category", failures.clone());
        registry.register("reconcile_duration_seconds", "Reconcile duration", duration.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the Lease and runs the controllers", leader.clone());
        Metrics { registry, reconciles, failures, duration, leader }
    }
}

impl Metrics {
    /// Records one reconcile that started at `started`.
    pub fn observe<T>(&self, controller: &'static str, result: &Result<T, Error>, started: Instant) {
        self.duration.observe(started.elapsed().as_secs_f64());
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.reconciles.get_or_create(&ReconcileLabels { controller, result: outcome }).inc();
        if let Err(e) = result {
            self.failures.get_or_create(&FailureLabels { controller, category: e.category() }).inc();
        }
    }

    /// Records whether this replica runs the controllers.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_counted_by_result_and_failures_by_category() {
        let m = Metrics::default();
        m.observe("topic", &Ok::<(), Error>(()), Instant::now());
        m.observe::<()>("topic", &Err(Error::MissingNamespace), Instant::now());
        // As a reconcile returns its errors: wrapped by the finalizer.
        use kube::runtime::finalizer::Error as F;
        let down = Error::Apply(crate::jetstream::ApplyError::BrokerUnavailable("no connection".into()));
        m.observe::<()>("topic", &Err(Error::Finalizer(Box::new(F::CleanupFailed(down)))), Instant::now());
        let wrapped = Error::Finalizer(Box::new(F::ApplyFailed(Error::MissingNamespace)));
        m.observe::<()>("subscription", &Err(wrapped), Instant::now());
        m.set_leader(true);
        let text = m.encode();
        for line in [
            "ferry_operator_reconciles_total{controller=\"topic\",result=\"ok\"} 1",
            "ferry_operator_reconciles_total{controller=\"topic\",result=\"error\"} 2",
            "ferry_operator_reconcile_failures_total{controller=\"topic\",category=\"MissingNamespace\"} 1",
            "ferry_operator_reconcile_failures_total{controller=\"topic\",category=\"BrokerUnavailable\"} 1",
            "ferry_operator_reconcile_failures_total{controller=\"subscription\",category=\"MissingNamespace\"} 1",
            "ferry_operator_reconcile_duration_seconds_count 4",
            "ferry_operator_leader 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
